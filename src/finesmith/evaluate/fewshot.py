"""Few-shot prompts: k training examples placed as earlier chat turns."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from finesmith.data.formats import Example


def select_shots(pool: Sequence[Example], query: Example, k: int, seed: int) -> list[Example]:
    """k examples drawn (seeded per query) from `pool`, never the query itself."""
    if k <= 0:
        return []
    candidates = [ex for ex in pool if ex.messages != query.messages]
    rng = random.Random(f"{seed}:{query.source}")
    return rng.sample(candidates, min(k, len(candidates)))


def few_shot_messages(query: Example, shots: Sequence[Example]) -> list[dict[str, Any]]:
    """The query's prompt with each shot's turns (minus system messages) placed before it."""
    prompt = query.prompt_messages
    system = [m for m in prompt[:1] if m["role"] == "system"]
    turns: list[dict[str, Any]] = []
    for shot in shots:
        turns.extend({"role": m["role"], "content": m["content"]} for m in shot.messages if m["role"] != "system")
    return system + turns + prompt[len(system):]
