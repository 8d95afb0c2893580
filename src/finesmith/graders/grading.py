"""The two entry points: `validate(grader)` and `grade(grader, sample, item)`.

Grader objects are the hosted graders API's JSON: `string_check`, `text_similarity`, `python`,
`score_model`, `label_model` and `multi` (which combines the others with a formula; a multi
grader's sub-graders may not be multi graders, as in the hosted API).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping
from typing import Any

import finesmith.graders.formula as formulas
import finesmith.graders.model_graders as model_graders
import finesmith.graders.python_grader as python_grader
import finesmith.graders.similarity as similarity
import finesmith.graders.string_check as string_check
from finesmith.graders.model_graders import Chat
from finesmith.graders.python_grader import DEFAULT_LIMITS, PythonLimits
from finesmith.graders.result import GradeResult, GraderError, GradingFailure, add_usage
from finesmith.graders.similarity import Embed
from finesmith.graders.templates import render, sample_namespace

TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")
FIELDS = {
    "string_check": {"type", "name", "input", "reference", "operation"},
    "text_similarity": {"type", "name", "input", "reference", "evaluation_metric", "pass_threshold"},
    "python": {"type", "name", "source", "image_tag"},
    "score_model": {"type", "name", "model", "input", "range", "sampling_params", "pass_threshold"},
    "label_model": {"type", "name", "model", "input", "labels", "passing_labels"},
    "multi": {"type", "name", "graders", "calculate_output"},
}
REQUIRED = {
    "string_check": ("input", "reference", "operation"),
    "text_similarity": ("input", "reference", "evaluation_metric"),
    "python": ("source",),
    "score_model": ("model", "input"),
    "label_model": ("model", "input", "labels", "passing_labels"),
    "multi": ("graders", "calculate_output"),
}


def validate(grader: Any, *, models: Collection[str] | None = None, embed: Embed | None = None,
             param: str = "grader") -> dict[str, Any]:
    """The grader in its normalized form (defaults filled in), or GraderError naming the field.

    `models`: the judge models this server serves (None: judge names are not checked).
    `embed`: the embedding function `cosine` similarity uses (None: cosine is refused).
    """
    if not isinstance(grader, dict):
        raise GraderError(param, f"must be a grader object, not {type(grader).__name__}")
    kind = grader.get("type")
    if kind not in TYPES:
        raise GraderError(f"{param}.type", f"must be one of {', '.join(TYPES)}, not {kind!r}")
    name = grader.get("name")
    if not isinstance(name, str) or not name.strip():
        raise GraderError(f"{param}.name", "must be a non-empty string")
    extra = sorted(set(grader) - FIELDS[kind])
    if extra:
        raise GraderError(f"{param}.{extra[0]}", f"is not a field of a {kind} grader (its fields: "
                          f"{', '.join(sorted(FIELDS[kind]))})")
    missing = [key for key in REQUIRED[kind] if grader.get(key) is None]
    if missing:
        raise GraderError(f"{param}.{missing[0]}", f"is required for a {kind} grader")
    if kind == "string_check":
        return string_check.validate(grader, param)
    if kind == "text_similarity":
        return similarity.validate(grader, param, embed)
    if kind == "python":
        return python_grader.validate(grader, param)
    if kind in ("score_model", "label_model"):
        return model_graders.validate(grader, param, models)
    return _validate_multi(grader, param, models, embed)


def _validate_multi(grader: dict[str, Any], param: str, models: Collection[str] | None,
                    embed: Embed | None) -> dict[str, Any]:
    graders = grader["graders"]
    if isinstance(graders, dict) and isinstance(graders.get("type"), str):  # one grader, as some SDK types have it
        graders = {graders.get("name") if isinstance(graders.get("name"), str) else "grader": graders}
    if not isinstance(graders, dict) or not graders:
        raise GraderError(f"{param}.graders", "must be an object mapping names to graders, e.g. "
                          '{"exact": {...}, "similar": {...}}')
    subs = {}
    for key, sub in graders.items():
        if not key.isidentifier():
            raise GraderError(f"{param}.graders", f"the key {key!r} cannot be used in a formula; use letters, "
                              "digits and _ (not starting with a digit)")
        if isinstance(sub, dict) and sub.get("type") == "multi":
            raise GraderError(f"{param}.graders.{key}.type", "a multi grader cannot contain another multi grader")
        subs[key] = validate(sub, models=models, embed=embed, param=f"{param}.graders.{key}")
    calculate = grader["calculate_output"]
    if not isinstance(calculate, str):
        raise GraderError(f"{param}.calculate_output", "must be a formula string, e.g. (a + b) / 2")
    try:
        formulas.parse(calculate, subs)
    except formulas.FormulaError as exc:
        raise GraderError(f"{param}.calculate_output", str(exc)) from None
    return {"type": "multi", "name": grader["name"], "graders": subs, "calculate_output": calculate}


def uses_models(grader: Mapping[str, Any]) -> list[str]:
    """The judge models a (normalized) grader calls."""
    if grader.get("type") in ("score_model", "label_model"):
        return [grader["model"]]
    if grader.get("type") == "multi":
        return [m for sub in grader["graders"].values() for m in uses_models(sub)]
    return []


def grade(grader: Any, sample: Any, item: Any = None, *, chat: Chat | None = None, embed: Embed | None = None,
          limits: PythonLimits = DEFAULT_LIMITS, validated: bool = False) -> GradeResult:
    """Grade one model answer.

    `sample`: the answer (a string, the hosted API's `model_sample`) or a ready `sample`
    namespace dict (`output_text`, ...). `item`: the dataset row (the `item` namespace).
    `chat`: the judge for model graders (`chat(model, messages, sampling) -> text`).
    `validated`: the grader is already `validate`'s output (skips validating it again).

    Never raises for a problem of the grading itself: the result then has reward 0, an error
    flag and a one-line `message`. Raises GraderError when the grader is invalid.
    """
    if not validated:
        grader = validate(grader, embed=embed)
    started = time.perf_counter()
    namespace = sample_namespace(sample)
    result = _grade(grader, namespace, item, chat, embed, limits)
    result.execution_time = time.perf_counter() - started
    return result


def _grade(grader: dict[str, Any], sample: dict[str, Any], item: Any, chat: Chat | None, embed: Embed | None,
           limits: PythonLimits) -> GradeResult:
    kind = grader["type"]
    result = GradeResult(name=grader["name"], type=kind)
    if kind in ("text_similarity", "score_model") and "pass_threshold" in grader or kind == "label_model":
        result.passed = False
    try:
        if kind == "multi":
            return _grade_multi(grader, sample, item, chat, embed, limits, result)
        result.reward = _reward(grader, sample, item, chat, embed, limits, result)
    except GradingFailure as failure:
        return result.fail(failure)
    except Exception as exc:  # noqa: BLE001 - a bug or a library failure fails this grading, not the caller
        text = " ".join(str(exc).split())[:300]
        return result.fail(GradingFailure("other_error", f"{kind} grader failed: {type(exc).__name__}: {text}"))
    if kind in ("text_similarity", "score_model") and "pass_threshold" in grader:
        result.passed = result.reward >= grader["pass_threshold"]
    elif kind == "string_check":
        result.passed = result.reward == 1.0
    return result


def _reward(grader: dict[str, Any], sample: dict[str, Any], item: Any, chat: Chat | None, embed: Embed | None,
            limits: PythonLimits, result: GradeResult) -> float:
    kind = grader["type"]
    if kind == "string_check":
        return string_check.check(grader["operation"], render(grader["input"], item, sample),
                                  render(grader["reference"], item, sample))
    if kind == "text_similarity":
        value = similarity.similarity(grader["evaluation_metric"], render(grader["input"], item, sample),
                                      render(grader["reference"], item, sample), embed)
        if not math.isfinite(value):
            raise GradingFailure("other_error", f"{grader['evaluation_metric']} gave {value}")
        return float(value)
    if kind == "python":
        return python_grader.run(grader["source"], sample, item, limits)
    text, usage = model_graders.ask(grader, item, sample, chat)
    result.sampled_model_name = grader["model"]
    if usage:
        result.token_usage = add_usage(None, usage)
        result.usage_per_model[grader["model"]] = dict(result.token_usage)
    if kind == "score_model":
        low, high = grader.get("range", [0.0, 1.0])
        score = model_graders.parse_score(text, low, high)
        result.scores["score"] = score
        return score
    label = model_graders.parse_label(text, grader["labels"])
    result.scores["label"] = label
    result.passed = label in grader["passing_labels"]
    return 1.0 if result.passed else 0.0


def _grade_multi(grader: dict[str, Any], sample: dict[str, Any], item: Any, chat: Chat | None, embed: Embed | None,
                 limits: PythonLimits, result: GradeResult) -> GradeResult:
    values: dict[str, float] = {}
    for key, sub in grader["graders"].items():
        started = time.perf_counter()
        part = _grade(sub, sample, item, chat, embed, limits)
        part.execution_time = time.perf_counter() - started
        values[key] = part.reward
        result.sub_rewards[key] = part.reward
        result.scores[key] = part.reward
        for flag, value in part.errors.items():  # a sub-grader's error is the multi grader's error
            if value and not result.errors.get(flag):
                result.errors[flag] = value
        if part.message and result.message is None:
            result.message = f"{key}: {part.message}"
        result.token_usage = add_usage(result.token_usage, part.token_usage)
        for model, usage in part.usage_per_model.items():
            result.usage_per_model[model] = add_usage(result.usage_per_model.get(model), usage)
        result.sampled_model_name = result.sampled_model_name or part.sampled_model_name
    if not result.ok:
        result.reward = 0.0
        return result
    try:
        result.reward = formulas.evaluate(formulas.parse(grader["calculate_output"], values), values)
    except formulas.FormulaError as exc:
        return result.fail(GradingFailure("formula_parse_error", f"calculate_output {exc}"))
    return result
