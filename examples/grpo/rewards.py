"""Reward functions of the GRPO demo (`reward: examples/grpo/rewards.py:correct`).

finesmith calls each as `function(prompt=..., completion=..., **fields)`; the data rows carry
`answer` (the number) and `reference` (the reference line `Answer: N`)."""

from __future__ import annotations

import re

LINE = re.compile(r"Answer: (-?\d+)")


def correct(completion: str, answer: int, **_) -> float:
    """1.0 when the answer is exactly one line `Answer: N` with the right N, else 0."""
    found = LINE.fullmatch(completion.strip())
    return float(found is not None and int(found.group(1)) == int(answer))
