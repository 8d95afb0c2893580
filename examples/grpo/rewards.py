"""Reward function of the GRPO demo (`reward: examples/grpo/rewards.py:correct`).

finesmith calls it as `correct(prompt=..., completion=..., reference=..., answer=...)`: the
data rows carry `answer`, the order number."""

from __future__ import annotations

import re

LINE = re.compile(r"Order: (\d+)")


def correct(completion: str, answer: str, **_) -> float:
    """1.0 when the whole answer is one line `Order: <number>` with the message's number, else 0."""
    found = LINE.fullmatch(completion.strip())
    return float(found is not None and found.group(1) == str(answer))
