"""How big a dataset is, in the tokens the model will actually see."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finesmith.data.formats import TextExample, load_examples
from finesmith.data.tokenize import TokenizedExample, tokenize_examples


@dataclass(frozen=True)
class DataStats:
    """Token counts after chat-template rendering and truncation.

    Attributes:
        examples: trainable examples (raw documents count once per `max_length` window).
        tokens: tokens in one epoch.
        supervised: trained tokens in one epoch.
        lengths: tokens per example, sorted ascending.
        supervised_lengths: trained tokens per example, in the same order as `lengths`.
        raw_text_tokens: tokens that come from plain-text documents (continued pre-training data).
    """

    examples: int
    tokens: int
    supervised: int
    lengths: tuple[int, ...]
    supervised_lengths: tuple[int, ...]
    raw_text_tokens: int = 0

    def percentile(self, q: float) -> int:
        if not self.lengths:
            return 0
        return self.lengths[min(len(self.lengths) - 1, int(q * (len(self.lengths) - 1) + 0.5))]

    @property
    def mean_length(self) -> float:
        return self.tokens / max(1, self.examples)

    def largest_batch(self, batch_size: int) -> tuple[int, int]:
        """(tokens, supervised tokens) of a micro-batch made of the longest examples: the memory peak."""
        k = max(1, min(batch_size, len(self.lengths)))
        return sum(self.lengths[-k:]), sum(self.supervised_lengths[-k:])

    @classmethod
    def synthetic(cls, examples: int, mean_tokens: int, supervised_share: float = 0.3,
                  raw_text: bool = False) -> "DataStats":
        """Stats of `examples` equal-length examples, for planning without a file."""
        supervised = int(mean_tokens * (1.0 if raw_text else supervised_share))
        return cls(examples, examples * mean_tokens, examples * supervised, (mean_tokens,) * examples,
                   (supervised,) * examples, examples * mean_tokens if raw_text else 0)


def measure_dataset(tokenizer: Any, path: str, max_length: int, fmt: str = "auto",
                    truncation: str = "truncate") -> DataStats:
    """Tokenize a data file with the model's chat template and count what training would see.

    Args:
        tokenizer: the model's tokenizer (with its chat template).
        path: the data file.
        max_length: tokens per example (longer examples are truncated or dropped).
        fmt: the data format (auto-detected by default).
        truncation: truncate | drop.
    Returns:
        The DataStats.
    """
    examples = load_examples(path, fmt)
    raw_sources = {e.source for e in examples if isinstance(e, TextExample)}
    tokenized, _ = tokenize_examples(tokenizer, examples, max_length, truncation)
    return stats_of(tokenized, raw_sources)


def stats_of(tokenized: Sequence[TokenizedExample], raw_sources: set[str] | frozenset[str] = frozenset()) -> DataStats:
    """DataStats of already tokenized examples; `raw_sources` marks plain-text documents."""
    pairs = sorted((len(t.input_ids), sum(t.supervised)) for t in tokenized)
    raw_tokens = sum(len(t.input_ids) for t in tokenized if t.source in raw_sources)
    return DataStats(len(pairs), sum(p[0] for p in pairs), sum(p[1] for p in pairs),
                     tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), raw_tokens)
