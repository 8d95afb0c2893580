"""Evaluation tasks on a held-out file: classification, open generation, perplexity.

- classification: answers come from a small label set. Scored two ways: the greedy answer
  (what a user would see) and label log-likelihood (which label the model finds most
  probable; robust for small models that drift from the answer format).
- generation: free-form answers; exact match, token F1, ROUGE-L, chrF.
- perplexity: raw text (`{"text": ...}` rows) or the answers of a chat file.

`infer_task` picks one from the data when the user does not say.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from finesmith.data.formats import AnyExample, Example, TextExample
from finesmith.data.tokenize import TokenizedExample, lm_windows, tokens_and_mask
from finesmith.errors import FinesmithError
from finesmith.evaluate.fewshot import SHOT_FORMATS, STRATEGIES, ShotSelector, budgeted_prompt
from finesmith.evaluate.generate import generate
from finesmith.evaluate.loglik import label_logprobs
from finesmith.evaluate.metrics import classification_metrics, generation_metrics, normalise_answer

TASKS = ("classification", "generation", "perplexity")
SCORINGS = ("generate", "loglik", "both")
MAX_LABELS = 50


@dataclass
class EvalOptions:
    """How to evaluate. Every field but `max_length` is a flag of `finesmith eval`."""

    task: str = "auto"  # auto | classification | generation | perplexity
    shots: int = 0  # k training examples shown before each query
    shot_strategy: str = "random"  # random | balanced | similar
    shot_format: str = "chat"  # chat (earlier turns) | inline (one user message)
    max_prompt_tokens: int | None = None  # drop shots until the prompt fits
    scoring: str = "both"  # classification: generate | loglik | both
    seed: int = 42
    max_new_tokens: int = 32
    batch_size: int = 16
    max_length: int = 2048  # perplexity: tokens per example

    def validate(self) -> "EvalOptions":
        """Check choices and ranges; return self for chaining."""
        for name, value, allowed in (("task", self.task, ("auto",) + TASKS), ("scoring", self.scoring, SCORINGS),
                                     ("shot strategy", self.shot_strategy, STRATEGIES),
                                     ("shot format", self.shot_format, SHOT_FORMATS)):
            if value not in allowed:
                raise FinesmithError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if self.shots < 0:
            raise FinesmithError(f"--shots must be 0 or more, got {self.shots}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise FinesmithError(f"--max-prompt-tokens must be at least 1, got {self.max_prompt_tokens}")
        return self


@dataclass
class EvalResult:
    """Metrics and per-example predictions. `accuracy` is the headline number (None for perplexity)."""

    task: str
    n: int
    shots: int
    accuracy: float | None
    metrics: dict[str, Any]
    labels: list[str] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "n": self.n, "shots": self.shots, "accuracy": self.accuracy,
                "metrics": self.metrics, "labels": self.labels, "seconds": round(self.seconds, 2),
                "predictions": self.predictions}


def infer_task(references: Sequence[str]) -> str:
    """`classification` when the references repeat a few distinct answers, else `generation`.

    A label set is "few" when there are at most half as many distinct normalised answers
    as examples (each label appears twice or more on average) and at most 50.
    """
    distinct = len({normalise_answer(r) for r in references})
    return "classification" if distinct <= min(MAX_LABELS, max(2, len(references) // 2)) else "generation"


def label_set(references: Sequence[str]) -> tuple[list[str], list[str]]:
    """(normalised labels, their most common surface form), sorted by normalised label."""
    forms: dict[str, Counter] = {}
    for ref in references:
        forms.setdefault(normalise_answer(ref), Counter())[ref.strip()] += 1
    labels = sorted(forms)
    return labels, [forms[label].most_common(1)[0][0] for label in labels]


def build_prompts(tokenizer: Any, examples: Sequence[Example], pool: Sequence[Example],
                  options: EvalOptions) -> tuple[list[list[dict[str, Any]]], list[int]]:
    """Each example's prompt with its shots, and how many shots survived the token budget."""
    selector = ShotSelector(pool, options.shot_strategy, options.seed)
    built = [budgeted_prompt(tokenizer, ex, selector.select(ex, options.shots), options.shot_format,
                             options.max_prompt_tokens) for ex in examples]
    return [messages for messages, _ in built], [kept for _, kept in built]


def evaluate_examples(model: Any, tokenizer: Any, examples: Sequence[AnyExample], pool: Sequence[AnyExample] = (),
                      options: EvalOptions | None = None) -> EvalResult:
    """Evaluate held-out examples as one task.

    Args:
        model, tokenizer: the model under test.
        examples: held-out examples: conversations (the last assistant turn is the
            reference) or raw texts (perplexity only).
        pool: examples to draw shots from (needed when `options.shots > 0`).
        options: see `EvalOptions`; `task="auto"` infers the task from the references.

    Returns:
        An `EvalResult` with metrics and one prediction record per example.
    """
    options = (options or EvalOptions()).validate()
    started = time.perf_counter()
    if any(isinstance(ex, TextExample) for ex in examples):
        result = evaluate_texts(model, tokenizer, examples, options)
    else:
        conversations = conversations_only(examples, "evaluate")
        shot_pool = conversations_only(pool, "draw shots from")
        if options.shots and not shot_pool:
            raise FinesmithError("--shots needs a --shots-from file with at least one example")
        result = evaluate_conversations(model, tokenizer, conversations, shot_pool, options)
    result.seconds = time.perf_counter() - started
    return result


def conversations_only(examples: Sequence[AnyExample], purpose: str) -> list[Example]:
    """The examples, checked to be conversations (not raw text or preference pairs)."""
    for ex in examples:
        if not isinstance(ex, Example):
            raise FinesmithError(f"{ex.source}: cannot {purpose} a {type(ex).__name__}; "
                                 "use chat, Alpaca or prompt/completion rows (raw text supports --task perplexity)")
    return list(examples)


def evaluate_texts(model: Any, tokenizer: Any, examples: Sequence[AnyExample], options: EvalOptions) -> EvalResult:
    """Perplexity of raw texts (every token after the first is scored)."""
    if options.task not in ("auto", "perplexity"):
        raise FinesmithError(f"raw text supports only --task perplexity, not {options.task}; "
                             "give chat or instruction rows for the other tasks")
    mixed = next((ex for ex in examples if not isinstance(ex, TextExample)), None)
    if mixed is not None:
        raise FinesmithError(f"{mixed.source}: the file mixes raw text with other rows; evaluate them separately")
    return perplexity_result(model, lm_windows(tokenizer, [(ex.source, ex.text) for ex in examples],
                                               options.max_length), options)


def evaluate_conversations(model: Any, tokenizer: Any, examples: Sequence[Example], pool: Sequence[Example],
                           options: EvalOptions) -> EvalResult:
    """Classification, generation or answer perplexity of conversations."""
    references = [ex.answer for ex in examples]
    task = infer_task(references) if options.task == "auto" else options.task
    if task == "perplexity":
        tokenized = [TokenizedExample(*map(tuple, tokens_and_mask(tokenizer, list(ex.messages))), ex.source)
                     for ex in examples]
        return perplexity_result(model, tokenized, options)
    prompts, kept = build_prompts(tokenizer, examples, pool, options)
    records = [{"source": ex.source, "prompt": ex.prompt_messages[-1]["content"] if ex.prompt_messages else "",
                "reference": ex.answer, "shots": k} for ex, k in zip(examples, kept)]
    if task == "classification":
        return classify(model, tokenizer, prompts, references, records, options)
    return open_generation(model, tokenizer, prompts, references, records, options)


def classify(model: Any, tokenizer: Any, prompts: list[list[dict[str, Any]]], references: Sequence[str],
             records: list[dict[str, Any]], options: EvalOptions) -> EvalResult:
    """Classification metrics from greedy answers and/or label log-likelihood."""
    labels, surface = label_set(references)
    gold = [normalise_answer(r) for r in references]
    metrics: dict[str, Any] = {}
    if options.scoring in ("generate", "both"):
        answers = generate(model, tokenizer, prompts, options.max_new_tokens, options.batch_size)
        metrics["generate"] = classification_metrics(gold, [normalise_answer(a) for a in answers], labels)
        for record, answer, ref in zip(records, answers, gold):
            record.update(prediction=answer, correct=normalise_answer(answer) == ref)
    if options.scoring in ("loglik", "both"):
        scores = label_logprobs(model, tokenizer, prompts, surface)
        chosen = [max(range(len(labels)), key=row.__getitem__) for row in scores]
        metrics["loglik"] = classification_metrics(gold, [labels[c] for c in chosen], labels)
        for record, c, row, ref in zip(records, chosen, scores, gold):
            record.update(loglik_prediction=surface[c], loglik_correct=labels[c] == ref,
                          loglik_margin=round(row[c] - max((s for i, s in enumerate(row) if i != c), default=row[c]), 4))
    headline = metrics.get("generate", metrics.get("loglik"))["accuracy"]
    return EvalResult("classification", len(records), options.shots, headline, metrics, surface, records)


def open_generation(model: Any, tokenizer: Any, prompts: list[list[dict[str, Any]]], references: Sequence[str],
                    records: list[dict[str, Any]], options: EvalOptions) -> EvalResult:
    """Exact match, token F1, ROUGE-L and chrF of greedy answers."""
    answers = generate(model, tokenizer, prompts, options.max_new_tokens, options.batch_size)
    for record, answer, ref in zip(records, answers, references):
        record.update(prediction=answer, correct=normalise_answer(answer) == normalise_answer(ref))
    metrics = {"generate": generation_metrics(references, answers)}
    return EvalResult("generation", len(records), options.shots, metrics["generate"]["exact_match"], metrics, [], records)


def perplexity_result(model: Any, tokenized: Sequence[TokenizedExample], options: EvalOptions) -> EvalResult:
    """Perplexity: exp of the mean negative log-likelihood per supervised token."""
    from finesmith.train.loop import evaluate_loss

    if not tokenized:
        raise FinesmithError("nothing to measure perplexity on: every example is empty")
    tokenized = [TokenizedExample(t.input_ids[:options.max_length], t.supervised[:options.max_length], t.source)
                 for t in tokenized]
    nll = evaluate_loss(model, tokenized, options.batch_size)
    tokens = sum(sum(t.supervised[1:]) for t in tokenized)
    return EvalResult("perplexity", len(tokenized), 0, None,
                      {"perplexity": {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": tokens}})
