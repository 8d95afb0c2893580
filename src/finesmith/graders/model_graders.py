"""`score_model` and `label_model`: a judge model, served by finesmith, grades the answer.

The judge is named in the grader (`model`) and reached through a `chat` function the caller
injects: `chat(model, messages, sampling) -> str` (or a dict with `text` and, optionally,
`usage` in the OpenAI shape, `refusal`). The server passes one that submits to its engines;
tests pass a fake.

`input` is a list of messages (`role`: system, developer, user or assistant; `content`: a
template string, or text parts `input_text` / `output_text`), rendered with the item and the
sample. `developer` messages are sent as `system` (local chat templates have no developer
role). Images and audio are refused at validation: the served judges are text models.

As the hosted graders do, the judge is asked for structured output: `sampling` carries a
`response_format` JSON schema, `{"steps": [...], "result": number}` for score_model and
`{"steps": [...], "result": one of labels}` for label_model, along with `temperature`,
`top_p`, `seed` and `max_tokens` (from `sampling_params.max_completions_tokens`);
`reasoning_effort` is accepted and not used. The reply is parsed leniently (the JSON object,
in a code fence or not; or a bare number / bare label); a reply that gives no number in
`range` (score) or none of `labels` (label) is a `model_grader_parse_error`; a chat function
that raises is a `model_grader_server_error` with its message as details.

score_model: the reward is the score (pass_threshold, when given, sets `passed`).
label_model: the reward is 1.0 when the label is one of `passing_labels`, else 0.0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection
from typing import Any

from finesmith.graders.result import GraderError, GradingFailure
from finesmith.graders.templates import check_template, render

Chat = Callable[[str, list[dict[str, str]], dict[str, Any]], Any]
ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS = ("input_text", "output_text")
SAMPLING_KEYS = ("temperature", "top_p", "seed", "max_completions_tokens", "reasoning_effort")
STEPS_SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "description": {"type": "string"}, "conclusion": {"type": "string"}},
    "required": ["description", "conclusion"], "additionalProperties": False}}


def validate(grader: dict[str, Any], param: str, models: Collection[str] | None = None) -> dict[str, Any]:
    kind = grader["type"]
    model = grader.get("model")
    if not isinstance(model, str) or not model.strip():
        raise GraderError(f"{param}.model", "must name the judge model (one this server serves)")
    if models is not None and model not in models:
        shown = ", ".join(sorted(models)[:10]) or "none"
        raise GraderError(f"{param}.model", f"'{model}' is not a model this server serves (it serves: {shown})")
    out: dict[str, Any] = {"type": kind, "name": grader["name"], "model": model,
                           "input": _messages(grader.get("input"), f"{param}.input")}
    if kind == "score_model":
        out["range"] = _range(grader.get("range"), f"{param}.range")
        out["sampling_params"] = _sampling(grader.get("sampling_params"), f"{param}.sampling_params")
        threshold = grader.get("pass_threshold")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
                raise GraderError(f"{param}.pass_threshold", f"must be a number, not {threshold!r}")
            out["pass_threshold"] = float(threshold)
    else:
        labels = grader.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
            raise GraderError(f"{param}.labels", "must be a non-empty list of non-empty strings")
        if len(set(labels)) != len(labels):
            raise GraderError(f"{param}.labels", "has a label twice")
        passing = grader.get("passing_labels")
        if not isinstance(passing, list) or not passing or not all(isinstance(x, str) for x in passing):
            raise GraderError(f"{param}.passing_labels", "must be a non-empty list of labels")
        unknown = [x for x in passing if x not in labels]
        if unknown:
            raise GraderError(f"{param}.passing_labels", f"{unknown[0]!r} is not one of labels; passing_labels "
                              "must be a subset of labels")
        out["labels"], out["passing_labels"] = list(labels), list(passing)
    return out


def _messages(value: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise GraderError(param, "must be a non-empty list of messages ({role, content})")
    out = []
    for i, message in enumerate(value):
        where = f"{param}.{i}"
        if not isinstance(message, dict):
            raise GraderError(where, "must be a message object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise GraderError(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        if message.get("type", "message") != "message":
            raise GraderError(f"{where}.type", f"must be 'message', not {message.get('type')!r}")
        extra = set(message) - {"role", "content", "type"}
        if extra:
            raise GraderError(f"{where}.{sorted(extra)[0]}", "is not a field of a grader input message")
        out.append({"role": role, "content": _content(message.get("content"), f"{where}.content"),
                    "type": "message"})
    return out


def _content(content: Any, param: str) -> Any:
    if isinstance(content, str):
        return check_template(content, param)
    parts = content if isinstance(content, list) else [content] if isinstance(content, dict) else None
    if parts is None or not parts:
        raise GraderError(param, "must be a string or a list of text parts")
    out = []
    for j, part in enumerate(parts):
        where = f"{param}.{j}" if isinstance(content, list) else param
        if isinstance(part, str):
            out.append(check_template(part, where))
            continue
        if not isinstance(part, dict):
            raise GraderError(where, "must be a text part ({type: input_text, text})")
        kind = part.get("type")
        if kind in ("input_image", "input_audio"):
            raise GraderError(f"{where}.type", f"{kind} is not supported: the judge models this server serves "
                              "read text only")
        if kind not in TEXT_PARTS:
            raise GraderError(f"{where}.type", f"must be input_text or output_text, not {kind!r}")
        out.append({"type": kind, "text": check_template(part.get("text"), f"{where}.text")})
    return out if isinstance(content, list) else out[0]


def _range(value: Any, param: str) -> list[float]:
    if value is None:
        return [0.0, 1.0]
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)):
        raise GraderError(param, "must be two numbers [low, high]")
    if value[0] >= value[1]:
        raise GraderError(param, f"must have low < high, not {value}")
    return [float(value[0]), float(value[1])]


def _sampling(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GraderError(param, "must be an object")
    extra = set(value) - set(SAMPLING_KEYS)
    if extra:
        raise GraderError(f"{param}.{sorted(extra)[0]}", f"is not a sampling parameter (they are: "
                          f"{', '.join(SAMPLING_KEYS)})")
    out = {}
    for key, item in value.items():
        if item is None:
            continue
        if key == "reasoning_effort":
            if not isinstance(item, str):
                raise GraderError(f"{param}.{key}", "must be a string")
        elif key in ("seed", "max_completions_tokens"):
            if isinstance(item, bool) or not isinstance(item, int) or (key != "seed" and item < 1):
                raise GraderError(f"{param}.{key}", f"must be {'a positive' if key != 'seed' else 'an'} integer")
        elif isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) or item < 0:
            raise GraderError(f"{param}.{key}", "must be a non-negative number")
        out[key] = item
    return out


def render_messages(messages: list[dict[str, Any]], item: Any, sample: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages for the judge: templates rendered, text parts joined, developer → system."""
    out = []
    for message in messages:
        content = message["content"]
        parts = content if isinstance(content, list) else [content]
        text = "\n".join(render(p if isinstance(p, str) else p["text"], item, sample) for p in parts)
        out.append({"role": "system" if message["role"] == "developer" else message["role"], "content": text})
    return out


def sampling_for(grader: dict[str, Any]) -> dict[str, Any]:
    """The `sampling` argument of `chat`: the grader's sampling parameters and the reply schema."""
    params = grader.get("sampling_params") or {}
    sampling = {k: v for k, v in params.items() if k in ("temperature", "top_p", "seed")}
    if params.get("max_completions_tokens"):
        sampling["max_tokens"] = params["max_completions_tokens"]
    if grader["type"] == "score_model":
        result: dict[str, Any] = {"type": "number"}
        name = "score_model_grader_output"
    else:
        result = {"type": "string", "enum": list(grader["labels"])}
        name = "label_model_grader_output"
    sampling["response_format"] = {"type": "json_schema", "json_schema": {
        "name": name, "strict": True, "schema": {
            "type": "object", "properties": {"steps": STEPS_SCHEMA, "result": result},
            "required": ["steps", "result"], "additionalProperties": False}}}
    return sampling


def ask(grader: dict[str, Any], item: Any, sample: dict[str, Any], chat: Chat | None) -> tuple[str, dict | None]:
    """The judge's reply text and token usage (or None)."""
    if chat is None:
        raise GradingFailure("model_grader_server_error", f"no judge model is available to run {grader['type']} "
                             "graders here", model_grader_server_error_details="no chat function configured")
    messages = render_messages(grader["input"], item, sample)
    try:
        reply = chat(grader["model"], messages, sampling_for(grader))
    except Exception as exc:  # noqa: BLE001 - whatever the engine raises fails this grading only
        text = " ".join(str(exc).split())[:500] or type(exc).__name__
        raise GradingFailure("model_grader_server_error", f"the judge model {grader['model']} failed: {text}",
                             model_grader_server_error_details=text) from None
    usage = None
    if isinstance(reply, dict):
        if reply.get("refusal"):
            raise GradingFailure("model_grader_refusal_error", f"the judge model refused: {reply['refusal']}")
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else None
        reply = reply.get("text", reply.get("content"))
    if not isinstance(reply, str):
        raise GradingFailure("model_grader_parse_error", f"the judge model returned {type(reply).__name__}, not text")
    return reply, usage


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _reply_object(text: str) -> Any:
    """The JSON the reply holds (whole, in a code fence, or the outermost {...}), or None."""
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def parse_score(text: str, low: float, high: float) -> float:
    """The score the judge's reply gives, in [low, high]; GradingFailure when there is none."""
    value = _reply_object(text)
    if isinstance(value, dict):
        value = value.get("result", value.get("score"))
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GradingFailure("model_grader_parse_error", f"the judge's reply holds no score: {_short(text)}")
    if not low <= value <= high:
        raise GradingFailure("model_grader_parse_error", f"the judge's score {value:g} is outside the range "
                             f"[{low:g}, {high:g}]")
    return float(value)


def parse_label(text: str, labels: list[str]) -> str:
    """The label the judge's reply gives; GradingFailure when it is none of `labels`."""
    value = _reply_object(text)
    if isinstance(value, dict):
        value = value.get("result", value.get("label"))
    if isinstance(value, str) and value.strip() in labels:
        return value.strip()
    bare = text.strip().strip("\"'`.").strip()
    if bare in labels:
        return bare
    folded = {label.casefold(): label for label in labels}
    if isinstance(value, str) and value.strip().casefold() in folded:
        return folded[value.strip().casefold()]
    if bare.casefold() in folded:
        return folded[bare.casefold()]
    raise GradingFailure("model_grader_parse_error", f"the judge's reply is none of the labels "
                         f"({', '.join(labels)}): {_short(text)}")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= 120 else text[:117] + "...")
