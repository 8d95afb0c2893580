"""Reward functions for reinforcement fine-tuning: plain Python, called per sampled answer.

`reward: path/to/module.py:function` (or a list of them, weighted by `reward_weights`) names
a function called as `function(prompt=..., completion=..., **fields)`, where `fields` are
the example's other fields: `reference` (the reference answer, when the row has one) and
every other column of the row. It returns a number. Built-ins:

- `exact_match`: 1.0 when the completion equals the reference (whitespace and case ignored);
- `regex:PATTERN`: 1.0 when the whole stripped completion matches PATTERN;
- `length:MIN-MAX`: 1.0 when the stripped completion has MIN to MAX characters.

A function that raises, or returns something that is not a finite number, stops the run with
one line naming the function and the example.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finesmith.errors import FinesmithError


@dataclass(frozen=True)
class Reward:
    """One named reward function and its weight in the total."""

    name: str
    function: Callable[..., Any]
    weight: float = 1.0

    def __call__(self, prompt: str, completion: str, fields: dict[str, Any], source: str) -> float:
        arguments = {"prompt": prompt, "completion": completion, **fields}
        accepted = _accepted(self.function)
        if accepted is not None:
            arguments = {k: v for k, v in arguments.items() if k in accepted}  # what the function takes
        try:
            value = self.function(**arguments)
        except Exception as exc:
            raise FinesmithError(f"reward {self.name} failed on {source}: {type(exc).__name__}: {exc}; "
                                 "fix the function (it must return a number for every completion)") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FinesmithError(f"reward {self.name} returned {value!r} on {source}; it must return a finite "
                                 "number (int or float)")
        return float(value)


@functools.lru_cache(maxsize=None)
def _accepted(function: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword arguments `function` takes (None: any, it has **kwargs)."""
    params = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


def exact_match(completion: str, reference: str | None = None, **_: Any) -> float:
    if reference is None:
        raise ValueError("exact_match needs a reference answer in the example")
    return float(" ".join(completion.split()).lower() == " ".join(str(reference).split()).lower())


def regex_reward(pattern: str) -> Callable[..., float]:
    compiled = re.compile(pattern, re.DOTALL)
    return lambda completion, **_: float(compiled.fullmatch(completion.strip()) is not None)


def length_reward(low: int, high: int) -> Callable[..., float]:
    return lambda completion, **_: float(low <= len(completion.strip()) <= high)


def load_rewards(specs: list[str], weights: list[float] | None = None, base: Path | None = None) -> list[Reward]:
    """The reward functions `specs` name, with their weights (1 each by default).

    Raises:
        FinesmithError: a spec that names no file, no function, or a bad built-in.
    """
    if not specs:
        raise FinesmithError("objective grpo needs a reward: set `reward: rewards.py:function` (or a built-in: "
                             "exact_match, regex:PATTERN, length:MIN-MAX)")
    weights = list(weights or [])
    if weights and len(weights) != len(specs):
        raise FinesmithError(f"config: `reward_weights` has {len(weights)} values for {len(specs)} rewards; "
                             "give one weight per reward")
    return [Reward(spec, resolve(spec, base), weights[i] if weights else 1.0) for i, spec in enumerate(specs)]


def resolve(spec: str, base: Path | None = None) -> Callable[..., Any]:
    if spec == "exact_match":
        return exact_match
    if spec.startswith("regex:"):
        try:
            return regex_reward(spec[len("regex:"):])
        except re.error as exc:
            raise FinesmithError(f"reward {spec}: not a valid regular expression ({exc})") from None
    if spec.startswith("length:"):
        match = re.fullmatch(r"(\d+)-(\d+)", spec[len("length:"):])
        if not match or int(match.group(1)) > int(match.group(2)):
            raise FinesmithError(f"reward {spec}: write the band as length:MIN-MAX, e.g. length:10-80")
        return length_reward(int(match.group(1)), int(match.group(2)))
    path_text, _, name = spec.rpartition(":")
    if not path_text or not name:
        raise FinesmithError(f"reward {spec!r}: write it as path/to/module.py:function, or use a built-in "
                             "(exact_match, regex:PATTERN, length:MIN-MAX)")
    path = Path(path_text)
    if not path.is_absolute() and base is not None and not path.is_file():
        path = base / path
    if not path.is_file():
        raise FinesmithError(f"reward {spec}: no file {path_text}; give the path of a Python file")
    module_spec = importlib.util.spec_from_file_location(f"finesmith_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise FinesmithError(f"reward {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise FinesmithError(f"reward {spec}: {path} has no function {name}")
    params = inspect.signature(function).parameters
    if "completion" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise FinesmithError(f"reward {spec}: the function must take `completion` (and may take prompt, "
                             "reference and the example's other fields, or **kwargs)")
    return function
