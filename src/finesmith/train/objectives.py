"""Training objectives: `loss(model, batch) -> (sum of token losses, supervised tokens)`.

Returning the sum (not the mean) lets the loop divide once per optimizer step by the
number of supervised tokens in the whole step, which makes gradient accumulation exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from finesmith.data.pack import IGNORE


def sft_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on supervised positions of a packed batch.

    The LM head runs only where a target exists (`logits_to_keep` with the positions),
    so full-vocabulary logits for prompt tokens are never materialised.
    """
    targets = batch["targets"]
    keep = targets != IGNORE  # [R, T]; a boolean `logits_to_keep` selects positions row-major
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    kept = targets[keep]
    loss = F.cross_entropy(logits.float(), kept, reduction="sum")
    return loss, torch.tensor(kept.numel(), device=loss.device)


def virtual_sft_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy for prompt/prefix tuning on a right-padded batch (`pad_batch`).

    peft prepends the virtual tokens inside its forward: prompt tuning adds them to the
    input (the output has `num_virtual_tokens` extra positions in front), prefix tuning adds
    them as past keys/values (the output has exactly the input's positions). The LM head
    still runs only at positions where some row has a target, shifted by that offset.
    """
    logits, kept = _virtual_logits(model, batch)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), kept.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, (kept != IGNORE).sum()


def virtual_sequence_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[B]`: each padded row's summed log-probability of its trained tokens (prompt/prefix tuning)."""
    logits, kept = _virtual_logits(model, batch)
    token_nll = F.cross_entropy(logits.float().transpose(1, 2), kept, ignore_index=IGNORE, reduction="none")
    return -token_nll.sum(dim=-1)


def _virtual_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `[B, K, V]` at the K columns where some row has a target, and those targets `[B, K]`."""
    targets = batch["targets"]
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                logits_to_keep=keep + virtual_token_offset(model), use_cache=False)
    return out.logits, targets[:, keep]


def virtual_token_offset(model: Any) -> int:
    """Positions peft puts in front of the input in the model's output (0 for prefix tuning)."""
    config = model.active_peft_config
    return 0 if config.peft_type.value == "PREFIX_TUNING" else config.num_virtual_tokens


def uses_virtual_tokens(model: Any) -> bool:
    """True for peft prompt-learning models (prompt/prefix tuning), which need padded batches."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)
