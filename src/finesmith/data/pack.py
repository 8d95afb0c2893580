"""Padding-free packed batches: examples concatenated into rows, kept apart.

Position ids restart at 0 for every example, and a block-diagonal causal mask stops
attention from crossing example boundaries. Position ids alone are not enough with the
SDPA/eager attention paths: tokens would still attend to earlier examples in the row.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from finesmith.config import ROW_TOKENS
from finesmith.data.tokenize import TokenizedExample

IGNORE = -100


def pack_batch(examples: Sequence[TokenizedExample], row_tokens: int | None = ROW_TOKENS) -> dict[str, torch.Tensor]:
    """Pack examples into padding-free rows.

    With `row_tokens=None` (or when everything fits), all examples share one row. Otherwise
    they are grouped best-fit-decreasing into rows of at most `row_tokens` tokens (or the
    longest example, if longer): attention inside a row costs the square of its length, so
    several short rows are much cheaper than one long one, while the few padding slots
    that rows of unequal length need stay masked out.

    Returns:
        input_ids, position_ids: `[R, T]`.
        targets: `[R, T]`, the next token where it is trained, else -100 (already shifted:
            position t predicts targets[t]; the last token of each example predicts nothing).
        attention_mask: `[R, 1, T, T]` bool, True where a query may attend to a key.
        seq_lens: `[n]` tokens per example (padding excluded).
        row_lens: `[R]` real tokens per row (see `split_rows`).
    """
    lens = [len(ex.input_ids) for ex in examples]
    if row_tokens is None or sum(lens) <= row_tokens:
        rows = [list(range(len(examples)))]
    else:
        rows = pack_bins(lens, max(row_tokens, max(lens)))
    width = max(sum(lens[i] for i in row) for row in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    masks = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            ex, n = examples[i], lens[i]
            ids[r, start:start + n] = torch.tensor(ex.input_ids)
            positions[r, start:start + n] = torch.arange(n)
            targets[r, start:start + n - 1] = torch.tensor(
                [ex.input_ids[t + 1] if ex.supervised[t + 1] else IGNORE for t in range(n - 1)], dtype=torch.long)
            start += n
        # Padding slots become one-token "sequences" that see only themselves, so no
        # attention row is empty (an all-masked row makes SDPA return NaN).
        row_lens = [lens[i] for i in row] + [1] * (width - start)
        masks.append(block_causal_mask(torch.tensor(row_lens)))
    return {
        "input_ids": ids,
        "position_ids": positions,
        "targets": targets,
        "attention_mask": torch.stack(masks)[:, None],
        "seq_lens": torch.tensor(lens),
        "row_lens": torch.tensor([sum(lens[i] for i in row) for row in rows]),
    }


def split_rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The rows of a `pack_batch` batch as separate one-row batches, padding trimmed.

    Rows are independent, so running them one at a time gives the same summed loss and
    gradients with a fraction of the activation memory.
    """
    rows = []
    for r, n in enumerate(batch["row_lens"].tolist()):
        rows.append({"input_ids": batch["input_ids"][r:r + 1, :n], "position_ids": batch["position_ids"][r:r + 1, :n],
                     "targets": batch["targets"][r:r + 1, :n],
                     "attention_mask": batch["attention_mask"][r:r + 1, :, :n, :n]})
    return rows


def block_causal_mask(seq_lens: torch.Tensor) -> torch.Tensor:
    """`[T, T]` bool mask: causal within each sequence, nothing across sequences."""
    doc = torch.repeat_interleave(torch.arange(len(seq_lens)), seq_lens)
    total = int(seq_lens.sum())
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    return causal & (doc[:, None] == doc[None, :])


def pack_bins(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Best-fit-decreasing: group example indices into bins of at most `budget` tokens.

    Longest examples are placed first, each into the fullest bin that still has room, so
    few bins are left half empty. Within a bin, indices keep their order in `lengths`
    (the caller's shuffle), and bins come out in order of creation.

    Args:
        lengths: tokens per example.
        budget: most tokens per bin; an example longer than this gets a bin of its own.
    Returns:
        A list of bins, each a list of indices into `lengths`.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), kept sorted for bisection
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))  # least room that still fits = fullest bin
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (budget - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
    return [sorted(b) for b in bins]


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], budget: int) -> float:
    """Real tokens divided by the slots the bins offer (bins × budget)."""
    return sum(lengths) / max(1, len(bins) * budget)


def pad_batch(examples: Sequence[TokenizedExample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rectangle with a 2-D attention mask, for methods that prepend virtual tokens.

    Prompt and prefix tuning add tokens in front of every row inside the model's forward,
    which a packed row (several examples sharing one position stream) cannot express.

    Returns:
        input_ids, attention_mask, targets: `[B, T]` (targets shifted as in `pack_batch`,
            -100 on padding); seq_lens: `[B]`.
    """
    width = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        targets[row, : n - 1] = torch.tensor(
            [ex.input_ids[t + 1] if ex.supervised[t + 1] else IGNORE for t in range(n - 1)], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "targets": targets,
            "seq_lens": torch.tensor([len(ex) for ex in examples])}
