"""Padding-free packed batches: examples concatenated into one row, kept apart.

Position ids restart at 0 for every example, and a block-diagonal causal mask stops
attention from crossing example boundaries. Position ids alone are not enough with the
SDPA/eager attention paths: tokens would still attend to earlier examples in the row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from finesmith.data.tokenize import TokenizedExample

IGNORE = -100


def pack_batch(examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
    """Pack examples into one row.

    Returns:
        input_ids, position_ids: `[1, T]`.
        targets: `[1, T]`, the next token where it is trained, else -100 (already shifted:
            position t predicts targets[t]; the last token of each example predicts nothing).
        attention_mask: `[1, 1, T, T]` bool, True where a query may attend to a key.
        seq_lens: `[n]` tokens per example.
    """
    ids, positions, targets, lens = [], [], [], []
    for ex in examples:
        n = len(ex.input_ids)
        ids.extend(ex.input_ids)
        positions.extend(range(n))
        targets.extend(ex.input_ids[t + 1] if ex.supervised[t + 1] else IGNORE for t in range(n - 1))
        targets.append(IGNORE)
        lens.append(n)
    seq_lens = torch.tensor(lens)
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "targets": torch.tensor([targets]),
        "attention_mask": block_causal_mask(seq_lens)[None, None],
        "seq_lens": seq_lens,
    }


def block_causal_mask(seq_lens: torch.Tensor) -> torch.Tensor:
    """`[T, T]` bool mask: causal within each sequence, nothing across sequences."""
    doc = torch.repeat_interleave(torch.arange(len(seq_lens)), seq_lens)
    total = int(seq_lens.sum())
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    return causal & (doc[:, None] == doc[None, :])
