"""Constrained decoding for the server: `response_format` JSON and forced tool calls.

A grammar is compiled by llguidance (chosen in bench/grammar_engines.py: no dependencies,
sub-millisecond schema compiles, a token mask in tens of microseconds on a 49k vocabulary)
from a JSON schema or a Lark grammar, and a `Matcher` follows one row's tokens: before each
token the batch masks the logits to what the grammar allows (`allowed`), after it the matcher
takes the token (`take`); the row ends when the grammar is `complete`. JSON is compact (no
free whitespace), so a model cannot wander off into endless blank space. The end-of-turn
tokens are allowed exactly where the grammar may end.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from finesmith.errors import FinesmithError

JSON_OPTIONS = {"whitespace_flexible": False}  # compact: `{"a":1}`, separators without spaces


def json_grammar(schema: dict[str, Any] | None) -> str:
    """A grammar for JSON that validates against `schema` (any JSON object when None)."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                             defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise FinesmithError(f"the JSON schema is not valid: {exc}") from None


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def lark_json(schema: dict[str, Any]) -> str:
    """A Lark rule body that matches compact JSON valid against `schema`."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def lark_literal(tokenizer: Any, text: str) -> str:
    """`text` as a Lark terminal: a single added token (like `<tool_call>`) by its id, as the
    model writes it; anything else as a string."""
    token = tokenizer.convert_tokens_to_ids(text) if text in tokenizer.get_added_vocab() else None
    return f"<[{token}]>" if token is not None else json.dumps(text)


class GrammarTokenizer:
    """llguidance's view of one tokenizer (built once per engine: about a second for a large vocabulary)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        import llguidance.hf

        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, len(tokenizer))
        self.ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=list(stop_ids))

    def check(self, grammar: str) -> None:
        """Refuse a grammar llguidance cannot build, as a user error (the request's 400)."""
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll)
        if error:
            raise FinesmithError(f"the output format cannot be enforced: {error.splitlines()[0]}")

    def matcher(self, grammar: str) -> Matcher:
        return Matcher(self, grammar)


class Matcher:
    """One row's position in its grammar."""

    def __init__(self, owner: GrammarTokenizer, grammar: str) -> None:
        import llguidance

        self.owner = owner
        self.ll = llguidance.LLMatcher(owner.ll, grammar, log_level=0)
        self._raise_on_error()

    def allowed(self, size: int) -> torch.Tensor:
        """A boolean mask over `size` logits: True where the grammar allows the token."""
        bits = np.unpackbits(np.frombuffer(self.ll.compute_bitmask(), dtype=np.uint8), bitorder="little")
        self._raise_on_error()
        mask = np.zeros(size, dtype=bool)
        n = min(size, bits.size)
        mask[:n] = bits[:n].astype(bool)
        if not mask.any():
            raise FinesmithError("the output format allows no token here")
        return torch.from_numpy(mask)

    def take(self, token: int) -> None:
        self.ll.consume_token(token)
        self._raise_on_error()

    def complete(self) -> bool:
        """True once nothing more may be generated (the grammar has reached its end)."""
        return self.ll.is_stopped()

    def _raise_on_error(self) -> None:
        if self.ll.is_error():
            raise FinesmithError(f"constrained decoding failed: {self.ll.get_error().splitlines()[0]}")
