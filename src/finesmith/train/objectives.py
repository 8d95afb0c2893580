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
    targets = batch["targets"][0]
    keep = (targets != IGNORE).nonzero().squeeze(-1)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"], logits_to_keep=keep, use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, torch.tensor(keep.numel(), device=loss.device)
