"""Few-shot prompts: which training examples to show, and how to show them.

Strategies: `random`, `balanced` (round-robin over answer labels, so every label is shown
before any repeats) and `similar` (BM25 over the training prompts, most similar last, i.e.
closest to the query). `random` and `balanced` are *fixed* by default: one seeded draw, in one
order, shown before every query (a query that is itself among them gets the next one drawn
instead), so the comparison does not vary with which shots each query happened to get, and
the shared prefix is computed once. `fixed=False` draws them per query (seeded by the query). Shots become earlier chat turns (`chat`)
or one user message with worked examples (`inline`). A token budget drops shots, least
useful first, and never cuts the query itself.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from finesmith.data.formats import Example
from finesmith.data.tokenize import prompt_ids
from finesmith.errors import FinesmithError

STRATEGIES = ("random", "balanced", "similar")
SHOT_FORMATS = ("chat", "inline")


def prompt_text(example: Example) -> str:
    """The non-system prompt text of an example (what similarity is measured on)."""
    return "\n".join(m["content"] for m in example.prompt_messages if m["role"] != "system")


def bm25_tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class ShotSelector:
    """Picks k shots for a query from a pool; the query itself is never among them.

    Args:
        pool: training examples to draw from.
        strategy: one of `STRATEGIES`.
        seed: seeds the random choices.
        fixed: `random`/`balanced` show the same shots, in the same order, before every query.
    """

    def __init__(self, pool: Sequence[Example], strategy: str = "random", seed: int = 42, fixed: bool = True) -> None:
        if strategy not in STRATEGIES:
            raise FinesmithError(f"unknown shot strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        self.pool, self.strategy, self.seed = list(pool), strategy, seed
        self.fixed = fixed and strategy != "similar"
        self._draws: dict[int, list[int]] = {}
        self._bm25 = None
        if strategy == "similar" and self.pool:
            from rank_bm25 import BM25Okapi

            self._bm25 = BM25Okapi([bm25_tokens(prompt_text(ex)) or [""] for ex in self.pool])

    def select(self, query: Example, k: int) -> list[Example]:
        """Up to k shots for `query`, ordered so the most useful one comes last."""
        if k <= 0:
            return []
        if self.fixed:
            return [self.pool[i] for i in self.fixed_for(query, k)]
        allowed = [i for i, ex in enumerate(self.pool) if not same_prompt(ex, query)]
        rng = random.Random(f"{self.seed}:{query.source}")
        if self.strategy == "similar":
            return [self.pool[i] for i in reversed(self._most_similar(query, allowed, k))]
        if self.strategy == "balanced":
            return [self.pool[i] for i in balanced_choice(self.pool, allowed, k, rng)]
        return [self.pool[i] for i in rng.sample(allowed, min(k, len(allowed)))]

    def fixed_draw(self, k: int) -> list[int]:
        """The fixed shots for k, in prompt order: one seeded draw, the same for every query."""
        if k not in self._draws:
            rng = random.Random(f"{self.seed}:fixed")
            allowed = list(range(len(self.pool)))
            self._draws[k] = (balanced_choice(self.pool, allowed, k, rng) if self.strategy == "balanced"
                              else rng.sample(allowed, min(k, len(allowed))))
        return self._draws[k]

    def fixed_for(self, query: Example, k: int) -> list[int]:
        """The fixed shots, with any shot that asks the query's own question replaced in place
        by another pool example (of the same answer, when there is one)."""
        draw = self.fixed_draw(k)
        if not any(same_prompt(self.pool[i], query) for i in draw):
            return draw
        order = random.Random(f"{self.seed}:spares").sample(range(len(self.pool)), len(self.pool))
        spares = [i for i in order if i not in draw and not same_prompt(self.pool[i], query)]
        shots = []
        for i in draw:
            if not same_prompt(self.pool[i], query):
                shots.append(i)
                continue
            alike = [j for j in spares if self.pool[j].answer.strip() == self.pool[i].answer.strip()] or spares
            if alike:
                shots.append(alike[0])
                spares.remove(alike[0])
        return shots

    def _most_similar(self, query: Example, allowed: list[int], k: int) -> list[int]:
        scores = self._bm25.get_scores(bm25_tokens(prompt_text(query)))
        # Ties (e.g. no shared words) fall back to pool order, which keeps this deterministic.
        return sorted(allowed, key=lambda i: (-scores[i], i))[:k]


def same_prompt(a: Example, b: Example) -> bool:
    """True when two examples ask the same thing (a shot must never give the query away)."""
    return a.messages == b.messages or a.prompt_messages == b.prompt_messages


def balanced_choice(pool: Sequence[Example], allowed: list[int], k: int, rng: random.Random) -> list[int]:
    """k pool indices taking one example per label in turn (labels in seeded order)."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i in allowed:
        by_label[pool[i].answer.strip()].append(i)
    labels = sorted(by_label)
    rng.shuffle(labels)
    for members in by_label.values():
        rng.shuffle(members)
    chosen: list[int] = []
    while len(chosen) < min(k, len(allowed)):
        for label in labels:
            if by_label[label] and len(chosen) < k:
                chosen.append(by_label[label].pop())
    rng.shuffle(chosen)  # label order in the prompt should not hint at the answer
    return chosen


def few_shot_messages(query: Example, shots: Sequence[Example], shot_format: str = "chat") -> list[dict[str, Any]]:
    """The query's prompt with the shots in front of it.

    `chat`: each shot's turns (minus system messages) as earlier turns after the system
    prompt. `inline`: one user message listing the shots as `Input:`/`Output:` pairs, then
    the query's input.
    """
    prompt = query.prompt_messages
    system = [m for m in prompt[:1] if m["role"] == "system"]
    rest = [without_weight(m) for m in prompt[len(system):]]
    if not shots:
        return system + rest
    if shot_format == "inline":
        blocks = [f"Input: {prompt_text(shot)}\nOutput: {shot.answer}" for shot in shots]
        head = "Examples:\n\n" + "\n\n".join(blocks) + "\n\nNow answer this one.\nInput: "
        return system + rest[:-1] + [{"role": rest[-1]["role"], "content": head + rest[-1]["content"]}]
    if shot_format != "chat":
        raise FinesmithError(f"unknown shot format {shot_format!r}; use one of {', '.join(SHOT_FORMATS)}")
    turns: list[dict[str, Any]] = []
    for shot in shots:
        turns.extend(without_weight(m) for m in shot.messages if m["role"] != "system")
    return system + turns + rest


def without_weight(message: dict[str, Any]) -> dict[str, Any]:
    """A message as a prompt shows it: every field (tool calls, call ids) but the training weight."""
    return {key: value for key, value in message.items() if key != "weight"}


def budgeted_prompt(tokenizer: Any, query: Example, shots: Sequence[Example], shot_format: str,
                    max_prompt_tokens: int | None, tools: Sequence[dict[str, Any]] | None = None
                    ) -> tuple[list[dict[str, Any]], int]:
    """The few-shot prompt, dropping shots (farthest from the query first) to fit the budget.

    The query is never shortened: if it alone exceeds the budget it is kept whole with no shots.
    `tools` (the query's function schemas) count towards the budget as the prompt renders them.

    Returns:
        (messages, number of shots kept).
    """
    kept = list(shots)
    messages = few_shot_messages(query, kept, shot_format)
    if max_prompt_tokens is None:
        return messages, len(kept)
    while kept and len(prompt_ids(tokenizer, messages, tools)) > max_prompt_tokens:
        kept = kept[1:]
        messages = few_shot_messages(query, kept, shot_format)
    return messages, len(kept)
