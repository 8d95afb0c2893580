"""Preference data as token groups, and their packed layout with a shared prompt.

A *group* is the sequences that share one prompt: a preference pair (chosen, rejected), or
one answer with unpaired feedback (desirable or not, for KTO). Each sequence is tokenized
exactly as SFT tokenizes a conversation (`tokens_and_mask`: the answer and its end-of-turn
token are the scored tokens), so masks come from the same template rendering.

Layout: a group becomes one token trie. With `share_prompt`, the two sequences of a pair
share the path of their common beginning (the prompt, once) and branch where they differ;
every token attends to its own path only (an ancestor mask), with position ids by depth, so
each answer is computed exactly as if it followed the prompt alone. Without it, the two
sequences are separate paths (a block-diagonal mask). Tries are packed best-fit-decreasing
into rows of at most `row_tokens` tokens; a group never spans two rows, so each row is a
unit whose loss is a sum over whole groups and rows can run one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from finesmith.data.formats import AnyExample, FeedbackExample, PreferenceExample
from finesmith.data.pack import pack_bins
from finesmith.data.tokenize import TokenizedExample, TokenizeStats, bos_to_prepend, tokens_and_mask, truncate
from finesmith.errors import FinesmithError


@dataclass(frozen=True)
class TokenizedGroup:
    """Sequences sharing a prompt: (chosen, rejected) of a pair, or one answer with feedback.

    `reference` holds the reference model's summed log-probability of each sequence's
    scored tokens, once computed; `desirable` is set for unpaired feedback.
    """

    sequences: tuple[TokenizedExample, ...]
    source: str
    desirable: bool | None = None
    reference: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def input_ids(self) -> tuple[int, ...]:  # for fingerprints: all sequences in order
        return tuple(t for s in self.sequences for t in s.input_ids)

    @property
    def supervised(self) -> tuple[bool, ...]:
        return tuple(m for s in self.sequences for m in s.supervised)


def tokenize_groups(tokenizer: object, examples: Iterable[AnyExample], max_length: int,
                    truncation: str = "truncate", unpaired: bool = False) -> tuple[list[TokenizedGroup], TokenizeStats]:
    """Tokenize preference pairs or feedback examples into groups, applying the over-length policy.

    With `unpaired` (KTO), feedback rows are groups of one, and a preference pair gives two
    of them (the chosen answer desirable, the rejected one not).

    Raises:
        FinesmithError: an example this objective cannot train, naming its file:line.
    """
    stats, out = TokenizeStats(), []
    keep_bos = bos_to_prepend(tokenizer) is not None
    for example in examples:
        if isinstance(example, PreferenceExample) and not unpaired:
            items = [((example.chosen, example.rejected), None)]
        elif isinstance(example, PreferenceExample):
            items = [((example.chosen,), True), ((example.rejected,), False)]
        elif isinstance(example, FeedbackExample) and unpaired:
            items = [((example.completion,), example.desirable)]
        elif isinstance(example, FeedbackExample):
            raise FinesmithError(f"{example.source}: a feedback row (prompt/completion/label) has no pair to compare; "
                                 "train it with objective: kto, or give chosen and rejected answers")
        else:
            raise FinesmithError(f"{example.source}: preference objectives train on preference pairs "
                                 "(prompt/chosen/rejected) or feedback (prompt/completion/label); this row is a "
                                 f"{type(example).__name__}; use objective: sft for it")
        for answers, desirable in items:
            _add_group(tokenizer, example, answers, desirable, max_length, truncation, keep_bos, out, stats)
    return out, stats


def _add_group(tokenizer: object, example: PreferenceExample | FeedbackExample, answers: tuple[str, ...],
               desirable: bool | None, max_length: int, truncation: str, keep_bos: bool,
               out: list[TokenizedGroup], stats: TokenizeStats) -> None:
    sequences, over = [], False
    for answer in answers:
        ids, mask = tokens_and_mask(tokenizer, list(example.prompt) + [{"role": "assistant", "content": answer}])
        if len(ids) > max_length:
            over = True
            ids, mask = truncate(ids, mask, max_length, keep_bos)
        sequences.append(TokenizedExample(tuple(ids), tuple(mask), example.source))
    if over and truncation == "drop":
        stats.dropped += 1
        return
    stats.truncated += over
    if not all(any(s.supervised[1:]) for s in sequences):
        stats.dropped += 1
        return
    out.append(TokenizedGroup(tuple(sequences), example.source, desirable))
    stats.examples += 1
    stats.tokens += sum(len(s) for s in sequences)
    stats.supervised_tokens += sum(sum(s.supervised) for s in sequences)


@dataclass
class GroupTrie:
    """One group as a trie: tokens, their depth and parent, and the scored tokens."""

    ids: list[int]
    positions: list[int]
    parents: list[int]
    targets: list[tuple[int, int, int]]  # (index of the predicting token, target id, sequence in group)


def group_trie(group: TokenizedGroup, share_prompt: bool = True) -> GroupTrie:
    """Merge a group's sequences into a trie (shared beginnings once when `share_prompt`)."""
    trie = GroupTrie([], [], [], [])
    children: dict[tuple[int, int, int, bool], int] = {}
    for s, seq in enumerate(group.sequences):
        node = -1
        for depth, (token, scored) in enumerate(zip(seq.input_ids, seq.supervised)):
            if scored and node >= 0:
                trie.targets.append((node, token, s))
            key = (-1 if share_prompt else s, node, token, scored)
            if key not in children:
                children[key] = len(trie.ids)
                trie.ids.append(token)
                trie.positions.append(depth)
                trie.parents.append(node)
            node = children[key]
    return trie


def ancestor_mask(parents_per_trie: Sequence[Sequence[int]]) -> torch.Tensor:
    """`[T, T]` bool: each token sees itself and its ancestors in its own trie, nothing else."""
    total = sum(len(p) for p in parents_per_trie)
    mask = torch.zeros(total, total, dtype=torch.bool)
    offset = 0
    for parents in parents_per_trie:
        for i, parent in enumerate(parents):
            if parent >= 0:
                mask[offset + i] = mask[offset + parent]
            mask[offset + i, offset + i] = True
        offset += len(parents)
    return mask


def pack_groups(groups: Sequence[TokenizedGroup], row_tokens: int | None = 512,
                share_prompt: bool = True) -> dict[str, object]:
    """A micro-batch of groups as independent one-row units (see the module docstring).

    Returns:
        `{"units": [unit, ...], "count": groups, "real_tokens": tokens}`; each unit holds
        input_ids/position_ids `[1, T]`, attention_mask `[1, 1, T, T]`, `keep` (positions
        whose logits are needed), `which` (per scored token, its index into `keep`),
        `target_ids`, `owner` (per scored token, its sequence in the unit), `seq_tokens`
        (scored tokens per sequence), `reference` (per sequence; NaN when not computed),
        `desirable` (per group: 1, 0, or -1 for pairs), `group_index` (per group, its index in
        `groups`) and `group_size` (sequences per group).
    """
    tries = [group_trie(g, share_prompt) for g in groups]
    sizes = [len(t.ids) for t in tries]
    budget = max([row_tokens or sum(sizes)] + sizes)
    rows = pack_bins(sizes, budget) if sum(sizes) > budget else [list(range(len(groups)))]
    units = [_unit([groups[i] for i in row], [tries[i] for i in row], row) for row in rows]
    return {"units": units, "count": torch.tensor(len(groups)), "real_tokens": torch.tensor(sum(sizes))}


def _unit(groups: list[TokenizedGroup], tries: list[GroupTrie], indices: list[int]) -> dict[str, torch.Tensor]:
    rows, targets, owners, seq_tokens, reference = [], [], [], [], []
    offset, seq_offset = 0, 0
    for group, trie in zip(groups, tries):
        for node, token, s in trie.targets:
            rows.append(offset + node)
            targets.append(token)
            owners.append(seq_offset + s)
        n = len(group.sequences)
        seq_tokens += [sum(1 for _, _, s in trie.targets if s == k) for k in range(n)]
        reference += list(group.reference) if group.reference is not None else [math.nan] * n
        offset += len(trie.ids)
        seq_offset += n
    keep, which = torch.tensor(rows).unique(return_inverse=True)
    return {
        "input_ids": torch.tensor([[t for trie in tries for t in trie.ids]]),
        "position_ids": torch.tensor([[p for trie in tries for p in trie.positions]]),
        "attention_mask": ancestor_mask([trie.parents for trie in tries])[None, None],
        "keep": keep, "which": which, "target_ids": torch.tensor(targets), "owner": torch.tensor(owners),
        "seq_tokens": torch.tensor(seq_tokens), "reference": torch.tensor(reference, dtype=torch.float64),
        "desirable": torch.tensor([-1 if g.desirable is None else int(g.desirable) for g in groups]),
        "group_index": torch.tensor(indices), "group_size": torch.tensor([len(g.sequences) for g in groups]),
    }
