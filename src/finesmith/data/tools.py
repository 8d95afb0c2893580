"""Tools, tool calls and content parts in chat data: the shapes people have, made one.

Chat files come in the hosted fine-tuning API's current shape, its older one, and
ShareGPT's; each is normalised to what chat templates take (transformers passes `tools=`
and the message fields through to the template):

- tools: `{"type": "function", "function": {"name", "description"?, "parameters"?}}`
  (the older top-level `functions` list holds the inner objects; ShareGPT files often
  store the list as a JSON string);
- an assistant turn: `{"role": "assistant", "content": str, "tool_calls": [{"id", "type":
  "function", "function": {"name", "arguments": dict}}]}`, with `arguments` parsed from the
  JSON string the hosted API uses (templates render a dict), from the older
  `function_call: {name, arguments}`, or from a ShareGPT `function_call` turn;
- a tool result: `{"role": "tool", "content": str, "tool_call_id"?, "name"?}`, from a
  `tool` message, the older `function` role, or a ShareGPT `observation` turn;
- `content` given as a list of parts: text parts joined with newlines; any other part
  (image, audio, file) is refused, as the models finesmith trains read text only.
"""

from __future__ import annotations

import json
from typing import Any

from finesmith.data.load import parse_json

TEXT_PART_TYPES = ("text", "input_text", "output_text")


def normalise_tools(value: Any) -> tuple[tuple[dict[str, Any], ...] | None, list[str]]:
    """`(tools, problems)` from a row's `tools`/`functions` value (None when there are none)."""
    if value is None:
        return None, []
    if isinstance(value, str):
        value, problem = parse_json(value) if value.strip() else ([], None)
        if problem:
            return None, [f"`tools` is a string but not a JSON list ({problem})"]
    if not isinstance(value, list):
        return None, [f"`tools` must be a list of function schemas, got {type(value).__name__}"]
    tools, problems = [], []
    for index, tool in enumerate(value, start=1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            problems.append(f"tool {index} has no function `name`; write {{\"type\": \"function\", "
                            "\"function\": {\"name\": ..., \"parameters\": {...}}}")
            continue
        tools.append({"type": "function", "function": function})
    return (tuple(tools) or None), problems


def content_text(content: Any, index: int, role: Any, problems: list[str]) -> Any:
    """A message's content as text: strings as they are, text parts joined, other parts refused."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type", "untyped") if isinstance(part, dict) else type(part).__name__
            problems.append(f"message {index} ({role}) has a content part of type {kind!r}; this model reads text "
                            "only, so remove the part or describe it in text")
            return None
    return "\n".join(texts)


def normalise_message(message: Any, index: int, problems: list[str]) -> Any:
    """One chat message in the normalised shape (a non-object is returned as is, for the checks)."""
    if not isinstance(message, dict):
        return message
    out = dict(message)
    if out.get("role") == "function":  # the older API's tool result
        out["role"] = "tool"
    out["content"] = content_text(out.get("content"), index, out.get("role"), problems)
    calls = out.pop("tool_calls", None)
    legacy = out.pop("function_call", None)
    if calls is None and legacy is not None:
        calls = [legacy]
    if calls is not None:
        if not isinstance(calls, list) or not calls:
            problems.append(f"message {index}: `tool_calls` must be a non-empty list")
        else:
            out["tool_calls"] = [normalise_call(call, index, k, problems) for k, call in enumerate(calls, start=1)]
            if out["content"] is None:
                out["content"] = ""
    if out.get("role") == "tool" and out.get("content") is None:
        out["content"] = ""  # a tool that returned nothing; checked for emptiness nowhere else
    return out


def normalise_call(call: Any, index: int, k: int, problems: list[str]) -> dict[str, Any]:
    """One tool call as `{"id", "type": "function", "function": {"name", "arguments": dict}}`."""
    where = f"message {index} tool call {k}"
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict):
        problems.append(f"{where} must be an object with `function: {{name, arguments}}`")
        return {"id": None, "type": "function", "function": {"name": "", "arguments": {}}}
    name = function.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{where} has no function `name`")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        parsed, problem = parse_json(arguments) if arguments.strip() else ({}, None)
        if problem or not isinstance(parsed, dict):
            why = problem.split(";")[0] if problem else "got " + type(parsed).__name__
            problems.append(f"{where} ({name}): `arguments` is not a JSON object ({why}); "
                            "write the arguments as a JSON object")
            parsed = {}
        arguments = parsed
    elif arguments is None:
        arguments = {}
    elif not isinstance(arguments, dict):
        problems.append(f"{where} ({name}): `arguments` must be a JSON object, got {type(arguments).__name__}")
        arguments = {}
    call_id = call.get("id") if isinstance(call, dict) else None
    return {"id": call_id if isinstance(call_id, str) else None, "type": "function",
            "function": {"name": name if isinstance(name, str) else "", "arguments": arguments}}


def sharegpt_turn(turn: dict[str, Any], role: str, index: int, problems: list[str]) -> dict[str, Any] | None:
    """A ShareGPT turn as a normalised message (`function_call` values are the call as JSON)."""
    value = turn.get("value")
    if turn.get("from") == "function_call":
        calls, problem = parse_json(value) if isinstance(value, str) else (value, None)
        if problem or not isinstance(calls, (dict, list)):
            problems.append(f"turn {index} (function_call): the value must be the call as JSON "
                            "({\"name\": ..., \"arguments\": {...}})")
            return None
        calls = calls if isinstance(calls, list) else [calls]
        message = {"role": "assistant", "content": "",
                   "tool_calls": [normalise_call(c, index, k, problems) for k, c in enumerate(calls, start=1)]}
    else:
        message = {"role": role, "content": content_text(value, index, role, problems)}
    if "weight" in turn:
        message["weight"] = turn["weight"]
    return message


def tool_problems(messages: list[dict[str, Any]], tools: tuple[dict[str, Any], ...] | None) -> list[str]:
    """Tool-use mistakes: a call to a function not in `tools`, a result for a call nobody made."""
    names = {t["function"]["name"] for t in tools} if tools else None
    problems: list[str] = []
    open_ids: set[str] = set()
    for index, message in enumerate(messages, start=1):
        if message.get("role") == "assistant":
            calls = message.get("tool_calls") or []
            open_ids = {c["id"] for c in calls if c.get("id")}
            for call in calls:
                name = call["function"]["name"]
                if names is not None and name and name not in names:
                    problems.append(f"message {index}: calls `{name}`, which is not in `tools` "
                                    f"({', '.join(sorted(names))}); add its schema or fix the name")
        elif message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if call_id and call_id not in open_ids:
                problems.append(f"message {index}: tool result for call id {call_id!r}, which the assistant turn "
                                "before it did not make; match `tool_call_id` to a call's `id`")
    return problems


def calls_as_text(calls: list[dict[str, Any]]) -> str:
    """Tool calls in a stable text form (for duplicate detection and reports)."""
    return json.dumps([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls],
                      sort_keys=True, ensure_ascii=False)
