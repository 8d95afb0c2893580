"""Evaluation tasks on a held-out file: classification, open generation, perplexity.

- classification: answers come from a small label set. Scored two ways: the greedy answer
  (what a user would see) and label log-likelihood (which label the model finds most
  probable; robust for small models that drift from the answer format).
- generation: free-form answers; exact match, token F1, ROUGE-L, chrF.
- perplexity: raw text (`{"text": ...}` rows) or the answers of a chat file.
- tool_call: references that call tools (the final assistant turn has `tool_calls`).
  Prompts carry each example's `tools`; the calls are parsed out of the greedy answer in
  any common text format and scored on names, arguments and exact match (see
  `finesmith.evaluate.toolcalls`). Text references in the same file get the generation
  metrics. Few-shot prompts are refused: each shot would need its own tool list.

`infer_task` picks one from the data when the user does not say (`tool_call` as soon as
one reference calls a tool).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from finesmith.config import TOOL_FORMATS
from finesmith.core.device import PRECISIONS
from finesmith.data.formats import AnyExample, Example, TextExample
from finesmith.data.tokenize import TokenizedExample, lm_windows, require_tool_support, tokens_and_mask, uses_tools
from finesmith.config import THINKING
from finesmith.data.tool_templates import install_tool_format
from finesmith.errors import FinesmithError
from finesmith.evaluate.fewshot import SHOT_FORMATS, STRATEGIES, ShotSelector, budgeted_prompt
from finesmith.evaluate.budget import parse_memory
from finesmith.evaluate.generate import answer_and_score, generate
from finesmith.evaluate.stats import expected_calibration_error, label_confidences
from finesmith.evaluate.metrics import classification_metrics, generation_metrics, normalise_answer
from finesmith.evaluate.toolcalls import (calls_json_length, format_calls, parse_tool_calls, score_calls,
                                          tool_call_metrics)

TASKS = ("classification", "generation", "perplexity", "tool_call")
SCORINGS = ("generate", "loglik", "both")
MAX_LABELS = 50


@dataclass
class EvalOptions:
    """How to evaluate. Every field but `max_length` and `tool_format` is a flag of `finesmith eval`."""

    task: str = "auto"  # auto | classification | generation | perplexity | tool_call
    shots: int = 0  # k training examples shown before each query
    shot_strategy: str = "auto"  # auto (balanced for classification, else random) | random | balanced | similar
    fixed_shots: bool = True  # random/balanced: the same shots in the same order before every query
    shot_format: str = "chat"  # chat (earlier turns) | inline (one user message)
    max_prompt_tokens: int | None = None  # drop shots until the prompt fits
    scoring: str = "both"  # classification: generate | loglik | both
    seed: int = 42
    max_new_tokens: int = 32
    batch_size: int = 16
    max_length: int = 2048  # perplexity: tokens per example
    # Data with tools: `hermes` renders them as text when the model's template cannot (as
    # training's `tool_format: hermes` does, so a base model sees its fine-tune's format);
    # `template` needs a template that renders tools.
    tool_format: str = "hermes"
    # Model dtype for inference: auto (bf16 on CUDA, fp32 on CPU; see core.device.inference_dtype) | fp32 | bf16 | fp16
    precision: str = "auto"
    # What evaluation may hold beyond the weights (KV caches, a prompt batch, the decoding pool):
    # auto (half the free RAM, or 80% of the free GPU memory) or a size such as 4GB; batch and
    # pool sizes follow from it (see finesmith.evaluate.budget)
    memory: str = "auto"
    # Reasoning models: ask with thinking on or off (a template with enable_thinking, e.g. Qwen3);
    # auto keeps what the model's template says (a run's template carries its training setting)
    thinking: str = "auto"

    def validate(self) -> "EvalOptions":
        """Check choices and ranges; return self for chaining."""
        for name, value, allowed in (("task", self.task, ("auto",) + TASKS), ("scoring", self.scoring, SCORINGS),
                                     ("shot strategy", self.shot_strategy, ("auto",) + STRATEGIES),
                                     ("shot format", self.shot_format, SHOT_FORMATS),
                                     ("tool format", self.tool_format, TOOL_FORMATS),
                                     ("precision", self.precision, PRECISIONS), ("thinking", self.thinking, THINKING)):
            if value not in allowed:
                raise FinesmithError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if self.shots < 0:
            raise FinesmithError(f"--shots must be 0 or more, got {self.shots}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise FinesmithError(f"--max-prompt-tokens must be at least 1, got {self.max_prompt_tokens}")
        parse_memory(self.memory)
        return self

    @property
    def memory_bytes(self) -> int | None:
        """The `memory` budget in bytes (None: auto)."""
        return parse_memory(self.memory)


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
    shot_info: dict[str, Any] = field(default_factory=dict)  # strategy, fixed?, the fixed shots in order

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "n": self.n, "shots": self.shots, "accuracy": self.accuracy,
                "metrics": self.metrics, "labels": self.labels, "seconds": round(self.seconds, 2),
                "shot_info": self.shot_info, "predictions": self.predictions}

    def correctness(self) -> list[bool] | None:
        """Per example, whether the headline scoring got it right (None when there is no headline)."""
        if self.accuracy is None or not self.predictions:
            return None
        key = "correct" if "correct" in self.predictions[0] else "loglik_correct"
        if key not in self.predictions[0]:
            return None
        return [bool(p.get(key)) for p in self.predictions]


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


def shot_strategy(options: EvalOptions, task: str) -> str:
    """The strategy `auto` stands for: `balanced` for classification (every label shown), else `random`."""
    if options.shot_strategy != "auto":
        return options.shot_strategy
    return "balanced" if task == "classification" else "random"


@dataclass
class Prompts:
    """Each example's prompt with its shots: the messages, how many shots survived the token
    budget, and a key naming the shots (prompts with equal keys share their prefix)."""

    messages: list[list[dict[str, Any]]]
    kept: list[int]
    groups: list[tuple[str, ...]]
    strategy: str = "random"
    fixed: bool = False

    def describe(self) -> dict[str, Any]:
        """What the report states about the shots: strategy, whether fixed, and their order."""
        info: dict[str, Any] = {"strategy": self.strategy, "fixed": self.fixed}
        if self.fixed and self.groups:
            info["order"] = list(Counter(self.groups).most_common(1)[0][0])
        return info


def build_prompts(tokenizer: Any, examples: Sequence[Example], pool: Sequence[Example],
                  options: EvalOptions, task: str = "generation") -> Prompts:
    """Each example's prompt with its shots (see `Prompts`)."""
    strategy = shot_strategy(options, task)
    selector = ShotSelector(pool, strategy, options.seed, options.fixed_shots)
    messages, kept, groups = [], [], []
    for ex in examples:
        shots = selector.select(ex, options.shots)
        prompt, k = budgeted_prompt(tokenizer, ex, shots, options.shot_format, options.max_prompt_tokens, ex.tools)
        messages.append(prompt)
        kept.append(k)
        groups.append(tuple(shot.source for shot in shots[len(shots) - k:]))
    return Prompts(messages, kept, groups, strategy, selector.fixed and options.shots > 0)


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
    """Classification, generation, tool calls or answer perplexity of conversations."""
    references = [ex.answer for ex in examples]
    calling = [ex for ex in examples if ex.answer_tool_calls]
    task = options.task if options.task != "auto" else "tool_call" if calling else infer_task(references)
    check_task_fits(task, examples, calling, options)
    prepare_tool_rendering(tokenizer, examples, options.tool_format)
    if task == "perplexity":
        tokenized = [TokenizedExample(*map(tuple, tokens_and_mask(tokenizer, list(ex.messages), ex.tools)), ex.source)
                     for ex in examples]
        return perplexity_result(model, tokenized, options)
    built = build_prompts(tokenizer, examples, pool, options, task)
    records = [{"source": ex.source, "prompt": ex.prompt_messages[-1]["content"] if ex.prompt_messages else "",
                "reference": ex.answer, "shots": k} for ex, k in zip(examples, built.kept)]
    tools = [ex.tools for ex in examples]  # each prompt is rendered with its example's function schemas
    if task == "tool_call":
        result = tool_calls(model, tokenizer, examples, built.messages, records, options)
    elif task == "classification":
        result = classify(model, tokenizer, built, references, records, options, tools)
    else:
        result = open_generation(model, tokenizer, built, references, records, options, tools)
    if options.shots:
        result.shot_info = built.describe()
    return result


def prepare_tool_rendering(tokenizer: Any, examples: Sequence[Example], tool_format: str) -> None:
    """When any example uses tools, make the tokenizer render them the way training does
    (`tool_format`, see `finesmith.data.tool_templates`), or refuse in one line."""
    with_tools = next((ex for ex in examples if uses_tools(ex)), None)
    if with_tools is not None:
        install_tool_format(tokenizer, tool_format)
        require_tool_support(tokenizer, with_tools.source)


def check_task_fits(task: str, examples: Sequence[Example], calling: Sequence[Example], options: EvalOptions) -> None:
    """Refuse a task the references cannot be scored on (one line, with the fix)."""
    if task == "tool_call" and not calling:
        raise FinesmithError(f"--task tool_call: none of the {len(examples)} references calls a tool (the final "
                             "assistant turns have no `tool_calls`); use another task")
    if task == "tool_call" and options.shots:
        raise FinesmithError("--shots is not supported for tool calls (every shot would need its own tools); "
                             "evaluate tool calls zero-shot")
    if task in ("classification", "generation") and calling:
        raise FinesmithError(f"{calling[0].source}: {len(calling)} references are tool calls, which {task} cannot "
                             "score; use --task tool_call (or auto)")


def classify(model: Any, tokenizer: Any, prompts: Prompts, references: Sequence[str],
             records: list[dict[str, Any]], options: EvalOptions,
             tools: Sequence[Any] | None = None) -> EvalResult:
    """Classification metrics from greedy answers and/or label log-likelihood (one pass over
    each prompt gives both, see `finesmith.evaluate.engine`)."""
    labels, surface = label_set(references)
    gold = [normalise_answer(r) for r in references]
    metrics: dict[str, Any] = {}
    generating = options.scoring in ("generate", "both")
    scoring = options.scoring in ("loglik", "both")
    description = " + ".join(part for part, on in (("answering", generating), ("scoring labels", scoring)) if on)
    answers, scores = answer_and_score(model, tokenizer, prompts.messages, surface if scoring else None,
                                       options.max_new_tokens if generating else 0, options.batch_size, tools,
                                       prompts.groups, description, options.memory_bytes)
    if generating:
        metrics["generate"] = classification_metrics(gold, [normalise_answer(a) for a in answers], labels)
        for record, answer, ref in zip(records, answers, gold):
            record.update(prediction=answer, correct=normalise_answer(answer) == ref)
    if scores is not None:
        chosen = [max(range(len(labels)), key=row.__getitem__) for row in scores]
        metrics["loglik"] = classification_metrics(gold, [labels[c] for c in chosen], labels)
        metrics["loglik"]["calibration"] = expected_calibration_error(
            label_confidences(scores), [labels[c] == ref for c, ref in zip(chosen, gold)])
        for record, c, row, ref in zip(records, chosen, scores, gold):
            record.update(loglik_prediction=surface[c], loglik_correct=labels[c] == ref,
                          loglik_margin=round(row[c] - max((s for i, s in enumerate(row) if i != c), default=row[c]), 4))
    headline = metrics.get("generate", metrics.get("loglik"))["accuracy"]
    return EvalResult("classification", len(records), options.shots, headline, metrics, surface, records)


def open_generation(model: Any, tokenizer: Any, prompts: Prompts, references: Sequence[str],
                    records: list[dict[str, Any]], options: EvalOptions,
                    tools: Sequence[Any] | None = None) -> EvalResult:
    """Exact match, token F1, ROUGE-L and chrF of greedy answers."""
    answers = generate(model, tokenizer, prompts.messages, options.max_new_tokens, options.batch_size, tools,
                       prompts.groups, options.memory_bytes)
    for record, answer, ref in zip(records, answers, references):
        record.update(prediction=answer, correct=normalise_answer(answer) == normalise_answer(ref))
    metrics = {"generate": generation_metrics(references, answers)}
    return EvalResult("generation", len(records), options.shots, metrics["generate"]["exact_match"], metrics, [], records)


def tool_calls(model: Any, tokenizer: Any, examples: Sequence[Example], prompts: list[list[dict[str, Any]]],
               records: list[dict[str, Any]], options: EvalOptions) -> EvalResult:
    """Tool calls parsed from greedy answers and scored against the reference calls.

    References that call tools give `metrics["tool_calls"]`; text references in the same
    file give `metrics["generate"]` (plus how often the model called a tool there instead).
    The headline accuracy is the share of all examples answered exactly (calls: names and
    arguments equal; text: normalised exact match). The generation budget is raised to fit
    the longest reference call, since a call cut short can never match.
    """
    reference = [ex.answer_tool_calls for ex in examples]
    budget = tool_call_budget(tokenizer, reference, options.max_new_tokens)
    answers = generate(model, tokenizer, prompts, budget, options.batch_size, tools=[ex.tools for ex in examples],
                       memory=options.memory_bytes)
    scores, called, text_refs, text_answers = [], [], [], []
    for record, answer, calls, ex in zip(records, answers, reference, examples):
        parsed = parse_tool_calls(answer)
        record.update(prediction=answer, predicted_tool_calls=parsed)
        if calls:
            score = score_calls(calls, parsed)
            scores.append(score)
            called.append(bool(parsed))
            record.update(reference=format_calls(calls), reference_tool_calls=calls, correct=score["arguments_exact"],
                          **{k: v for k, v in score.items() if k != "arguments_exact"})
        else:
            text_refs.append(ex.answer)
            text_answers.append(answer)
            record.update(correct=normalise_answer(answer) == normalise_answer(ex.answer))
    metrics: dict[str, Any] = {"tool_calls": {**tool_call_metrics(scores, called), "max_new_tokens": budget}}
    if text_refs:
        metrics["generate"] = {"n": len(text_refs), **generation_metrics(text_refs, text_answers),
                               "tool_call_rate": sum(bool(parse_tool_calls(a)) for a in text_answers) / len(text_refs)}
    accuracy = sum(bool(r["correct"]) for r in records) / max(1, len(records))
    return EvalResult("tool_call", len(records), 0, accuracy, metrics, [], records)


def tool_call_budget(tokenizer: Any, reference: Sequence[list[dict[str, Any]]], max_new_tokens: int) -> int:
    """`max_new_tokens`, raised to the longest reference call's JSON in tokens plus room for tags."""
    longest = max(reference, key=calls_json_length)
    if not longest:
        return max_new_tokens
    ids = tokenizer(json.dumps(longest, ensure_ascii=False), add_special_tokens=False)["input_ids"]
    return max(max_new_tokens, len(ids) + 16 * len(longest))


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
