"""Token log-probabilities in OpenAI's two shapes.

Chat completions: `logprobs.content = [{token, logprob, bytes, top_logprobs: [{token,
logprob, bytes}]}]`. Legacy completions: `logprobs = {tokens, token_logprobs, top_logprobs
(one {token: logprob} dict per token, None for the prompt's first), text_offset}`, the shape
lm-evaluation-harness reads for log-likelihoods (`echo: true` puts the prompt's tokens first).

The values come from `finesmith.serve.batch.TokenLogprob`: log-softmax of the model's raw
logits at temperature 1. A token's text is its own decoding; its bytes are the raw bytes
it stands for (a byte-level BPE piece of a character split over tokens has bytes but no
printable text of its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from finesmith.serve.batch import TokenLogprob


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character each byte is written as, reversed."""
    table = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(table), 0
    for b in range(256):
        if b not in table:
            table.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(table, chars)}


class TokenText:
    """Text and bytes of single tokens, cached per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        found = self.cache.get(token)
        if found is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            found = self.cache[token] = (text, self._bytes(token, text))
        return found

    def _bytes(self, token: int, text: str) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
                return [int(piece[3:5], 16)]
            decoder = byte_decoder()
            if "\ufffd" in text and all(c in decoder for c in piece):
                return [decoder[c] for c in piece]
        return list(text.encode("utf-8"))


def chat_logprobs(records: Sequence[TokenLogprob], text: TokenText, top: int) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` entries for generated tokens."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        word, raw = text(token)
        return {"token": word, "logprob": logprob, "bytes": raw}

    return [{**entry(r.token, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top[:top]]}
            for r in records]


def legacy_logprobs(records: Sequence[TokenLogprob], text: TokenText, start_offset: int) -> dict[str, Any]:
    """The completions endpoint's `logprobs` object; offsets count from `start_offset` characters."""
    tokens, offsets, offset = [], [], start_offset
    for r in records:
        word = text(r.token)[0]
        tokens.append(word)
        offsets.append(offset)
        offset += len(word)
    tops = []
    for r in records:
        if r.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for token, logprob in r.top:
            top.setdefault(text(token)[0], logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [r.logprob for r in records], "top_logprobs": tops,
            "text_offset": offsets}
