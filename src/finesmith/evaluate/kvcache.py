"""A KV cache that holds a shared prefix once and lends it to every row by reference.

Prompts that start alike (a system prompt and fixed few-shot examples) need the prefix's keys
and values in every attention call, but nothing requires a copy per row. Each layer of a
`PrefixedCache` keeps the prefix once (`[1, kv_heads, P, head_dim]`, shared by every batch
and decoding pool of its group) and each row's own tokens after it (`[rows, kv_heads, S,
head_dim]`). Attention gets the two joined for the duration of one layer's call: that join
is the only per-row view of the prefix, and it is freed before the next layer runs. What a
row holds is its own tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class Prefix:
    """The keys and values of a token prefix for one row, per layer (`[1, kv_heads, P, head_dim]`)."""

    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.ids)

    def extends(self, base: "Prefix | None") -> bool:
        """Whether `base` (None: the empty prefix) is this prefix or a beginning of it."""
        return base is None or base is self or (len(base) <= len(self) and self.ids[:len(base)] == base.ids)

    def tail(self, start: int, layer: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions `start:` of `layer`, as a view for `rows` rows (no copy)."""
        keys, values = self.layers[layer]
        return (keys[:, :, start:].expand(rows, -1, -1, -1), values[:, :, start:].expand(rows, -1, -1, -1))


class PrefixedLayer(DynamicLayer):
    """One layer's cache: the shared prefix (or none) and the rows' own keys and values after it.

    Own keys and values grow by concatenation, or, once `own` gave them buffers with room
    (decoding), in place: a decoding step then writes its token into the buffer instead of
    copying every row's keys into a block one token longer, which would leave the freed, slightly
    shorter blocks of every layer behind in the allocator's heap at each step.
    """

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.prefix = prefix
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._length = 0

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else self.prefix[0].shape[2]

    def own(self, keys: torch.Tensor, values: torch.Tensor, length: int | None = None) -> None:
        """Start from these own keys and values (`[rows, kv_heads, S, head_dim]`), without a copy.
        With `length`, they are buffers of which the first `length` columns are filled and the
        rest is room for tokens to come."""
        self.lazy_initialization(keys, values)
        if length is None:
            self.keys, self.values = keys, values
        else:
            self._buffers, self._length = (keys, values), length
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[2]
        if self._buffers is not None and end <= self._buffers[0].shape[2]:
            keys, values = self._buffers
            keys[:, :, self._length:end], values[:, :, self._length:end] = key_states, value_states
            self._length = end
            self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        else:
            self._buffers = None
            super().update(key_states, value_states, *args, **kwargs)
        if self.prefix is None:
            return self.keys, self.values
        rows = self.keys.shape[0]
        return (torch.cat([self.prefix[0].expand(rows, -1, -1, -1), self.keys], dim=2),
                torch.cat([self.prefix[1].expand(rows, -1, -1, -1), self.values], dim=2))

    def get_seq_length(self) -> int:
        return self.prefix_length + super().get_seq_length()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows at `indices` (their own keys and values; the prefix stays shared)."""
        if self._buffers is not None:
            self.own(self._buffers[0][indices], self._buffers[1][indices], self._length)
        elif self.is_initialized and self.keys.numel():
            self.keys, self.values = self.keys[indices], self.values[indices]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class PrefixedCache(DynamicCache):
    """A `DynamicCache` of `PrefixedLayer`s over `prefix` (None: rows without a shared prefix)."""

    def __init__(self, prefix: Prefix | None, layers: int) -> None:
        Cache.__init__(self, layers=[PrefixedLayer(prefix.layers[i] if prefix is not None else None)
                                     for i in range(layers)])

    def own_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's own (per-row) keys and values."""
        return [(layer.keys, layer.values) for layer in self.layers]
