"""Training objectives: `loss(model, batch) -> (sum of token losses, supervised tokens)`.

Returning the sum (not the mean) lets the loop divide once per optimizer step by the
number of supervised tokens in the whole step, which makes gradient accumulation exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from finesmith.data.pack import IGNORE
from finesmith.model.attention import attention_inputs


# Full-vocabulary fp32 logits above this many elements (256 MiB) are computed in chunks.
CHUNK_ABOVE_ELEMENTS = 2 ** 26
CHUNK_ELEMENTS = 2 ** 24  # one chunk's logits: 64 MiB in fp32 (e.g. 341 positions of a 49k vocabulary)


def sft_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on supervised positions of a packed batch.

    The LM head runs only where a target exists, so full-vocabulary logits for prompt tokens
    are never materialised. When the supervised positions × vocabulary would exceed
    `CHUNK_ABOVE_ELEMENTS` (a 128k vocabulary at 8k trained tokens is 4 GiB of fp32 logits,
    and as much again for their gradient), the loss runs over the final hidden states in
    chunks whose logits are recomputed in the backward pass (`chunked_cross_entropy`): peak
    memory then stays one chunk of logits, whatever the vocabulary and the batch.
    """
    targets = batch["targets"]
    keep = targets != IGNORE  # [R, T]; a boolean `logits_to_keep` selects positions row-major
    kept = targets[keep]
    parts = body_and_head(model)
    if parts is not None and kept.numel() * parts[1].weight.shape[0] > CHUNK_ABOVE_ELEMENTS:
        body, head = parts
        hidden = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                      **attention_inputs(batch)).last_hidden_state
        loss = chunked_cross_entropy(hidden[keep], kept, head)
        return loss, torch.tensor(kept.numel(), device=loss.device)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=keep,
                use_cache=False, **attention_inputs(batch))
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    loss = F.cross_entropy(logits.float(), kept, reduction="sum")
    return loss, torch.tensor(kept.numel(), device=loss.device)


def body_and_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder body, LM head) of a causal LM (through a peft wrapper), or None for models
    whose logits are more than the head's output (soft-capped or scaled logits)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    body = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or head is None or body is base or not hasattr(head, "weight"):
        return None
    return body, head


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: Any,
                          chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets`, `chunk` positions at a time.

    Each chunk's logits live only inside a checkpointed function: the forward keeps the
    chunk's loss, the backward recomputes its logits. The result and its gradients equal
    the unchunked computation (tested); the price is one more LM-head product per chunk.
    """
    from torch.utils.checkpoint import checkpoint

    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_chunk_loss, hidden[start:start + chunk], targets[start:start + chunk], head,
                                   use_reentrant=False)
    return total


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: Any) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


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
