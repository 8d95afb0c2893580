"""Tool calls: read them out of generated text, and score them against the reference calls.

Models write calls in different text formats: Hermes/Qwen (`<tool_call>{json}</tool_call>`),
Llama 3.1 (bare `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`),
Mistral (`[TOOL_CALLS] [{...}, {...}]`), or the hosted API's own shape
(`{"type": "function", "function": {...}}`). Rather than one parser per format,
`parse_tool_calls` scans the text for JSON values and keeps those shaped like a call: an
object with a string `name` and an `arguments` (or `parameters`) value, found alone, in a
list, or wrapped in `function` / `tool_calls`. Text around the calls is ignored.

A `<tool_call>` block whose JSON does not parse still counts as an attempted call when
its function name can be read (`arguments` is then None), so a model that picks the right
function but writes broken JSON scores on names and fails on arguments. Bare text that
is not valid JSON is never guessed at.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

ARGUMENT_KEYS = ("arguments", "parameters")
TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
NAME_IN_BROKEN_JSON = re.compile(r'"name"\s*:\s*"([^"\\]+)"')
_DECODER = json.JSONDecoder()


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The tool calls written in `text`, in order, as `{"name": str, "arguments": ...}`.

    `arguments` is a dict when the call's arguments are a JSON object (a JSON string that
    holds an object, as the hosted API writes them, is decoded too); otherwise the value
    as found (None for a `<tool_call>` block whose JSON is broken).
    """
    blocks = list(TOOL_CALL_BLOCK.finditer(text))
    if not blocks:
        return list(calls_in_text(text))
    calls: list[dict[str, Any]] = []
    for block in blocks:
        found = list(calls_in_text(block.group(1)))
        if not found:
            name = NAME_IN_BROKEN_JSON.search(block.group(1))
            found = [{"name": name.group(1), "arguments": None}] if name else []
        calls.extend(found)
    return calls


def calls_in_text(text: str) -> Iterator[dict[str, Any]]:
    """Every call-shaped JSON value in `text`, scanning left to right (see `calls_in_value`)."""
    index = 0
    while index < len(text):
        start = _next_json_start(text, index)
        if start < 0:
            return
        try:
            value, end = _DECODER.raw_decode(text, start)
        except ValueError:
            index = start + 1
            continue
        found = list(calls_in_value(value))
        yield from found
        # A value that holds no call may still contain one deeper down (look inside it).
        index = end if found else start + 1


def _next_json_start(text: str, index: int) -> int:
    positions = [p for p in (text.find("{", index), text.find("[", index)) if p >= 0]
    return min(positions) if positions else -1


def calls_in_value(value: Any) -> Iterator[dict[str, Any]]:
    """The calls in one parsed JSON value: a call object, a list of them, or one wrapped in
    `{"function": ...}` / `{"tool_calls": [...]}`."""
    if isinstance(value, list):
        for item in value:
            yield from calls_in_value(item)
    elif isinstance(value, dict):
        if isinstance(value.get("name"), str) and any(key in value for key in ARGUMENT_KEYS):
            raw = next(value[key] for key in ARGUMENT_KEYS if key in value)
            yield {"name": value["name"], "arguments": decode_arguments(raw)}
        elif isinstance(value.get("function"), dict):
            yield from calls_in_value(value["function"])
        elif isinstance(value.get("tool_calls"), list):
            yield from calls_in_value(value["tool_calls"])


def decode_arguments(raw: Any) -> Any:
    """Arguments as a dict when they are a JSON object or a JSON string holding one."""
    if isinstance(raw, str):
        try:
            decoded = json.loads(raw)
        except ValueError:
            return raw
        return decoded if isinstance(decoded, dict) else raw
    return raw


def score_calls(reference: Sequence[dict[str, Any]], predicted: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How well one answer's calls match the reference calls (paired by position).

    Returns:
        `{"name_correct", "arguments_parse", "arguments_exact", "arguments_matched",
        "arguments_total"}`: names equal in order; at least one call and every call's
        arguments a JSON object; names and argument dicts all equal; how many reference
        arguments (over all reference calls) the paired call gives the same value, of how
        many. A paired call with another function name matches none of its arguments;
        extra generated arguments do not lower `arguments_matched` but fail exact match.
    """
    name_correct = [c["name"] for c in predicted] == [c["name"] for c in reference]
    parses = bool(predicted) and all(isinstance(c["arguments"], dict) for c in predicted)
    matched = total = 0
    for index, ref in enumerate(reference):
        expected = ref.get("arguments") or {}
        total += len(expected)
        if index < len(predicted) and predicted[index]["name"] == ref["name"]:
            given = predicted[index]["arguments"]
            if isinstance(given, dict):
                matched += sum(key in given and given[key] == value for key, value in expected.items())
    exact = name_correct and parses and all(
        p["arguments"] == (r.get("arguments") or {}) for p, r in zip(predicted, reference))
    return {"name_correct": name_correct, "arguments_parse": parses, "arguments_exact": exact,
            "arguments_matched": matched, "arguments_total": total}


def tool_call_metrics(scores: Sequence[dict[str, Any]], called: Sequence[bool]) -> dict[str, Any]:
    """Aggregate per-example `score_calls` results.

    Args:
        scores: one `score_calls` result per example whose reference is a tool call.
        called: per example, whether the answer contained at least one call.

    Returns:
        `{"n", "name_accuracy", "arguments_parse_rate", "exact_match", "argument_accuracy",
        "call_rate"}`: shares of examples, except `argument_accuracy`, the share of all
        reference arguments matched (micro-averaged, so a call with many arguments weighs
        more; None when no reference call has arguments).
    """
    n = len(scores)
    share = (lambda key: sum(s[key] for s in scores) / n) if n else (lambda key: 0.0)
    total = sum(s["arguments_total"] for s in scores)
    from finesmith.evaluate.stats import wilson_interval

    return {"n": n, "name_accuracy": share("name_correct"), "arguments_parse_rate": share("arguments_parse"),
            "exact_match": share("arguments_exact"),
            "exact_match_ci": list(wilson_interval(sum(bool(s["arguments_exact"]) for s in scores), n)),
            "argument_accuracy": sum(s["arguments_matched"] for s in scores) / total if total else None,
            "call_rate": sum(called) / n if n else 0.0}


def format_calls(calls: Sequence[dict[str, Any]]) -> str:
    """Calls as `name({json arguments})`, one after another: how reports show them."""
    return "; ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in calls)


def calls_json_length(calls: Sequence[dict[str, Any]]) -> int:
    """Characters of the calls written as JSON: a floor for the text a model must generate."""
    return sum(len(json.dumps(c, ensure_ascii=False)) for c in calls)

