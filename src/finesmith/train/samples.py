"""Greedy answers for a few fixed eval prompts, written at every evaluation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finesmith.data.formats import Example
from finesmith.evaluate.generate import generate


class SampleWriter:
    """Called by the loop after each eval: appends one line per prompt to `samples.jsonl`.

    The same prompts every time, so the file shows how the answers change as training goes.
    """

    def __init__(self, tokenizer: Any, examples: Sequence[Example], path: Path, max_new_tokens: int):
        self.tokenizer, self.examples, self.path, self.max_new_tokens = tokenizer, list(examples), path, max_new_tokens

    def __call__(self, model: Any, step: int) -> None:
        answers = generate(model, self.tokenizer, [ex.prompt_messages for ex in self.examples],
                           max_new_tokens=self.max_new_tokens)
        with self.path.open("a", encoding="utf-8") as out:
            for index, (example, answer) in enumerate(zip(self.examples, answers)):
                out.write(json.dumps({"step": step, "index": index, "prompt": example.prompt_messages[-1]["content"],
                                      "reference": example.answer, "output": answer}) + "\n")
