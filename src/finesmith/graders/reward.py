"""Graders as GRPO reward functions: `reward_from_grader(grader)`.

A GRPO reward is called as `function(prompt=..., completion=..., **fields)`, where `fields`
are the row's `reference` and other columns (see `finesmith.train.rewards`). The adapter
grades `completion` as the sample and the row as the item: `item` holds every field, plus
`prompt` when the row has no field of that name, so `{{ item.reference }}` and
`{{ item.<column> }}` work as they do with the hosted service's RFT datasets.

A grading that fails (an error flag) gives 0.0, as a failed grading scores in the hosted
service, and does not stop the run; `on_error(message)` is called with its one-line message
when given (the trainer can log it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finesmith.graders.grading import grade, validate
from finesmith.graders.model_graders import Chat
from finesmith.graders.python_grader import DEFAULT_LIMITS, PythonLimits
from finesmith.graders.similarity import Embed


def reward_function(grader: dict[str, Any], *, chat: Chat | None = None, embed: Embed | None = None,
                    limits: PythonLimits = DEFAULT_LIMITS,
                    on_error: Callable[[str], None] | None = None) -> Callable[..., float]:
    """A reward function `(prompt, completion, **fields) -> float` that grades with `grader`.

    Raises:
        GraderError: the grader is invalid (checked once, here).
    """
    checked = validate(grader, embed=embed)

    def reward(prompt: str = "", completion: str = "", **fields: Any) -> float:
        item = dict(fields)
        item.setdefault("prompt", prompt)
        result = grade(checked, completion, item, chat=chat, embed=embed, limits=limits, validated=True)
        if not result.ok and on_error is not None:
            on_error(f"grader {checked['name']}: {result.message}")
        return float(result.reward)

    reward.__name__ = f"grader_{checked['type']}"
    reward.__qualname__ = reward.__name__
    reward.grader = checked  # type: ignore[attr-defined]
    return reward


def reward_from_grader(grader: dict[str, Any], *, weight: float = 1.0, chat: Chat | None = None,
                       embed: Embed | None = None, limits: PythonLimits = DEFAULT_LIMITS,
                       on_error: Callable[[str], None] | None = None) -> Any:
    """A `finesmith.train.rewards.Reward` named `<type>:<grader name>` that grades with `grader`.

    It runs in the training process (`isolated=False`): python graders already run each call
    in their own sandboxed process under the grader's limits, and model graders need the
    `chat` function, which cannot cross into the reward process.
    """
    from finesmith.train.rewards import Reward

    function = reward_function(grader, chat=chat, embed=embed, limits=limits, on_error=on_error)
    return Reward(f"{function.grader['type']}:{function.grader['name']}", function, weight)
