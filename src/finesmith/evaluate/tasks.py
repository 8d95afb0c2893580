"""Evaluation tasks: answer accuracy on a held-out file, zero-shot or k-shot."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from finesmith.data.formats import Example
from finesmith.evaluate.fewshot import few_shot_messages, select_shots
from finesmith.evaluate.generate import generate


def normalise_answer(text: str) -> str:
    """First line, lower-cased, whitespace collapsed: what exact-match compares."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return re.sub(r"\s+", " ", first).strip().lower()


@dataclass
class AccuracyResult:
    accuracy: float
    n: int
    shots: int
    predictions: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "shots": self.shots, "predictions": self.predictions}


def evaluate_accuracy(model: Any, tokenizer: Any, examples: Sequence[Example], shots: int = 0,
                      shot_pool: Sequence[Example] = (), seed: int = 42, max_new_tokens: int = 32,
                      batch_size: int = 16) -> AccuracyResult:
    """Exact-match accuracy of greedy answers (first line, case/whitespace-insensitive)."""
    prompts = [few_shot_messages(ex, select_shots(shot_pool, ex, shots, seed)) for ex in examples]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    predictions = [{"source": ex.source, "prompt": ex.prompt_messages[-1]["content"], "reference": ex.answer,
                    "prediction": answer, "correct": normalise_answer(answer) == normalise_answer(ex.answer)}
                   for ex, answer in zip(examples, answers)]
    correct = sum(p["correct"] for p in predictions)
    return AccuracyResult(correct / max(1, len(examples)), len(examples), shots, predictions)
