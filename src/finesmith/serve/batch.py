"""Batched decoding for the server: requests that arrive together are generated together.

The prompts are left-padded into one batch (an explicit attention mask and position ids,
so padding changes nothing) and prefilled in one forward pass; then each step feeds every
live row its last token through one forward pass over the shared KV cache. A row that
finishes (end of turn, stop string, token budget, its reader left) leaves the batch, and its
rows of the cache are dropped. Every row samples with its own generator, seeded from its
request's `seed`, so an answer does not depend on which other requests shared its batch.

A row may carry a grammar (`finesmith.serve.constrain`): its tokens are masked to those the
grammar allows before picking, and the row stops once the grammar is complete; rows without
one are untouched. A row that asks for log-probabilities gets, per generated token, the
log-softmax of the model's raw logits (temperature 1, before any mask) and the `top` most
likely tokens. A row whose own work fails (its grammar, its sampler) ends with reason
`error` and its exception; the other rows go on.

Rows may run on different LoRA adapters of one shared base (`finesmith.serve.adapters`): a
row's `adapter` names its adapter in the PEFT model (`__base__` for the base alone) and every
forward pass, the prefill and each decode step, routes the live rows to theirs (`routed`), so
one batch mixes fine-tunes. A row may also bring its own tokenizer and stop tokens
(fine-tunes of one base may have saved different chat templates).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

REPLACEMENT = "\ufffd"  # what a token that ends mid-character decodes to


@dataclass
class Row:
    """One request in the batch: its sampling, budget, tokens so far and text shown so far."""

    prompt: list[int]
    budget: int
    temperature: float
    top_p: float
    generator: torch.Generator
    emit: Callable[[str], bool]  # shows text; returns False once a stop string has been seen
    cancelled: Callable[[], bool]
    tokens: list[int] = field(default_factory=list)
    shown: int = 0  # characters of the decoded tokens already handed to `emit`
    reason: str | None = None
    logprobs: int | None = None  # record each token's log-probability and this many alternatives
    grammar: Any = None  # a `finesmith.serve.constrain.Matcher`: allowed tokens, and when it is complete
    records: list[TokenLogprob] = field(default_factory=list)  # per generated token, when `logprobs` is set
    error: BaseException | None = None
    adapter: str | None = None  # the row's adapter in a shared PEFT model (`__base__`: none); None: no routing
    tokenizer: Any = None  # decodes this row's tokens (default: the batch's)
    stop_ids: set[int] | None = None  # this row's end-of-turn tokens (default: the batch's)


@contextlib.contextmanager
def routed(model: Any, adapters: list[str | None]) -> Iterator[dict[str, Any]]:
    """Route each row to its adapter for the forward passes inside; yields the forward's keywords.

    No routed row: nothing. Rows of several adapters: peft's per-row `adapter_names` (each LoRA
    layer adds every adapter's update to its own rows). Rows that all share one adapter take the
    plain single-adapter path, cheaper on CPU (no per-row gather and scatter in every layer):
    that adapter is made the active one (`set_adapter`, frozen), or, for the base alone, the
    adapters are switched off for the pass. Same arithmetic either way.
    """
    if all(a is None for a in adapters):
        yield {}
        return
    names = {a or "__base__" for a in adapters}
    if len(names) > 1:
        yield {"adapter_names": [a or "__base__" for a in adapters]}
    elif names == {"__base__"}:
        with model.disable_adapter():
            yield {}
    else:
        (name,) = names
        if model.active_adapter != name:
            model.set_adapter(name, inference_mode=True)
        yield {}


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (None for a prompt's first token) and the
    most likely tokens at its position as (id, log-probability), best first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-softmax under raw `logits` (one position), with the `top` best alternatives."""
    scores = torch.log_softmax(logits.float(), dim=-1)
    best = ()
    if top > 0:
        values, ids = torch.topk(scores, min(top, scores.shape[-1]))
        best = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(scores[token]), best)


PROMPT_CHUNK = 512  # prompt positions scored per forward pass: bounds the logits held at once


def prompt_logprobs(model: Any, prompt: list[int], top: int, last: list[torch.Tensor] | None = None,
                    adapter: str | None = None) -> list[TokenLogprob]:
    """Every prompt token's log-probability given the tokens before it (the first token has
    none): the prompt alone, run in chunks of `PROMPT_CHUNK` positions over a KV cache, so a
    long prompt never holds all its positions' full-vocabulary logits at once. With `last`,
    the logits after the whole prompt (for its first new token) are appended to it; `adapter`
    routes the prompt to one adapter of a shared PEFT model."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    cache, kw = DynamicCache(), cache_keyword(model)
    out = [TokenLogprob(prompt[0], None)]
    with torch.inference_mode():
        scored = len(prompt) if last is not None else len(prompt) - 1  # positions run through the model
        for start in range(0, scored, PROMPT_CHUNK):
            stop = min(start + PROMPT_CHUNK, scored)
            end = min(stop, len(prompt) - 1)  # positions start..end-1 score tokens start+1..end
            positions = torch.arange(start, stop, device=device).unsqueeze(0)
            with routed(model, [adapter]) as route:
                logits = model(input_ids=ids[:, start:stop], position_ids=positions, use_cache=True,
                               **{kw: cache}, **route).logits[0]
            if stop == len(prompt):
                last.append(logits[-1])
                logits = logits[:end - start]
            scores = torch.log_softmax(logits.float(), dim=-1)
            chosen = scores.gather(1, ids[0, start + 1:end + 1].unsqueeze(1)).squeeze(1).tolist()
            best = torch.topk(scores, min(top, scores.shape[-1])) if top > 0 else None
            for i, token in enumerate(prompt[start + 1:end + 1]):
                alternatives = tuple(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else ()
                out.append(TokenLogprob(token, chosen[i], alternatives))
    return out


def cache_keyword(model: Any) -> str:
    """transformers 5.x renames `past_key_values` to `cache`; the name this model's forward takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


SEED_RANGE = 2**64  # torch seeds are 64-bit; a request's int64 seed (negative too) maps into it


def row_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % SEED_RANGE)
    return generator


def choose(logits: torch.Tensor, row: Row) -> int:
    """The row's next token: masked by its grammar, if any; its log-probability recorded, if asked."""
    raw = logits
    if row.grammar is not None:
        logits = logits.masked_fill(~row.grammar.allowed(logits.shape[-1]).to(logits.device), float("-inf"))
    token = pick(logits, row)
    if row.logprobs is not None:
        row.records.append(token_logprob(raw, token, row.logprobs))
    if row.grammar is not None:
        row.grammar.take(token)
    return token


def pick(logits: torch.Tensor, row: Row) -> int:
    """Greedy at temperature 0, else temperature and nucleus (top-p) sampling with the row's generator."""
    if row.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / row.temperature, dim=-1)
    if row.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(ordered, dim=-1) - ordered < row.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=row.generator))


def decode_batch(model: Any, tokenizer: Any, rows: list[Row], stop_ids: set[int], pad_id: int,
                 deadline: Callable[[], float | None]) -> None:
    """Generate for every row until each has a `reason`: stop, length or cancelled (`interrupted`
    when the deadline passed)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(r.prompt) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row.prompt):] = torch.tensor(row.prompt)
        mask[i, width - len(row.prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    cache_kw = cache_keyword(model)
    live = list(range(len(rows)))
    with torch.inference_mode():
        with routed(model, [r.adapter for r in rows]) as route:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **{cache_kw: cache}, **route).logits[:, -1]
        while True:
            limit = deadline()
            interrupted = limit is not None and time.monotonic() > limit
            keep, last = [], []
            for slot, index in enumerate(live):
                row = rows[index]
                if interrupted:
                    row.reason = "interrupted"
                elif row.cancelled():
                    row.reason = "cancelled"
                else:
                    try:
                        row.reason = step(row.tokenizer or tokenizer, row, choose(logits[slot], row),
                                          stop_ids if row.stop_ids is None else row.stop_ids)
                    except Exception as exc:  # this row's own failure (its grammar, its sampler) ends it alone
                        row.reason, row.error = "error", exc
                if row.reason is None:
                    keep.append(slot)
                    last.append(row.tokens[-1])
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                live = [live[slot] for slot in keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            step_ids = torch.tensor(last, device=device).unsqueeze(1)
            with routed(model, [rows[i].adapter for i in live]) as route:
                logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                               **{cache_kw: cache}, **route).logits[:, -1]


def step(tokenizer: Any, row: Row, token: int, stop_ids: set[int]) -> str | None:
    """Take one token for `row`, show any new text; the row's finish reason, or None to go on."""
    if token in stop_ids:
        row.tokens.append(token)
        flush(tokenizer, row)
        return "stop"
    row.tokens.append(token)
    text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    if not text.endswith(REPLACEMENT) and len(text) > row.shown:
        piece, row.shown = text[row.shown:], len(text)
        if not row.emit(piece):
            return "stop"
    if row.grammar is not None and row.grammar.complete():  # nothing more may follow: done
        flush(tokenizer, row)
        return "stop"
    if len(row.tokens) >= row.budget:
        flush(tokenizer, row)
        return "length"
    return None


def flush(tokenizer: Any, row: Row) -> None:
    """Show what is left undisplayed (a trailing partial character at the very end)."""
    text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    if len(text) > row.shown:
        piece, row.shown = text[row.shown:], len(text)
        row.emit(piece)
