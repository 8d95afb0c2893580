"""Chat rendering and the supervised-token mask, produced together in one place.

The mask is derived by rendering prefixes of the conversation with the model's own chat
template, never by searching for marker strings: the text added when an assistant turn
is appended (minus trailing whitespace after its end-of-turn token) is exactly what the
model must learn to produce. Training, evaluation and inference all call these functions,
so they always see the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from finesmith.data.formats import Example
from finesmith.errors import FinesmithError


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids with a parallel mask: True where the token is trained (predicted)."""

    input_ids: tuple[int, ...]
    supervised: tuple[bool, ...]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


def render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans to train on.

    Each trained span runs from the end of the rendered prompt before an assistant turn
    to the end of that turn including its end-of-turn marker (whitespace the template
    puts after the marker is not part of the answer). Assistant turns with `weight: 0`
    are rendered but not trained.
    """
    text = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        full = render(tokenizer, messages[: index + 1])
        if not (full.startswith(prompt) and text.startswith(full)):
            raise FinesmithError(
                "the chat template does not render conversations incrementally (a turn changes "
                "earlier text), so the answer mask cannot be derived; use a template without "
                "history rewriting")
        end = len(full.rstrip())
        spans.append((len(prompt), end))
    return text, spans


def tokens_and_mask(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and the supervised mask, with exactly one BOS."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    supervised = [any(start <= a < end for start, end in spans) for a, _ in encoded["offset_mapping"]]
    bos = bos_to_prepend(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        supervised.insert(0, False)
    return ids, supervised


def bos_to_prepend(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer adds one by itself (templates may already render it)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids for a generation prompt (conversation + the assistant header)."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = bos_to_prepend(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    supervised_tokens: int = 0


def tokenize_examples(tokenizer: Any, examples: Iterable[Example], max_length: int,
                      truncation: str = "truncate") -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize and mask examples, applying the over-length policy.

    `truncate` keeps the start of the example when that keeps trained tokens, otherwise
    keeps a window that ends with the last trained token (dropping the oldest context);
    `drop` skips over-long examples. Either way the numbers are counted in the stats.
    """
    stats = TokenizeStats()
    out = []
    for example in examples:
        ids, mask = tokens_and_mask(tokenizer, list(example.messages))
        if len(ids) > max_length:
            if truncation == "drop":
                stats.dropped += 1
                continue
            ids, mask = truncate(ids, mask, max_length, bos_to_prepend(tokenizer) is not None or _starts_with_bos(tokenizer, ids))
            stats.truncated += 1
        if not any(mask[1:]):
            stats.dropped += 1  # nothing left to learn (e.g. every assistant turn has weight 0)
            continue
        out.append(TokenizedExample(tuple(ids), tuple(mask), example.source))
        stats.examples += 1
        stats.tokens += len(ids)
        stats.supervised_tokens += sum(mask)
    return out, stats


def _starts_with_bos(tokenizer: Any, ids: list[int]) -> bool:
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def truncate(ids: list[int], mask: list[bool], max_length: int, keep_bos: bool) -> tuple[list[int], list[bool]]:
    """Cut an over-long example to `max_length` tokens without losing every trained token."""
    if any(mask[1:max_length]):
        return ids[:max_length], mask[:max_length]
    last = max(i for i, m in enumerate(mask) if m) + 1
    if keep_bos:
        window = range(last - max_length + 1, last)
        return [ids[0]] + [ids[i] for i in window], [False] + [mask[i] for i in window]
    return ids[last - max_length:last], mask[last - max_length:last]
