"""Tool calling on the chat endpoint: render the request's tools, read the reply's calls.

The tools go to the model's chat template when it renders tools (a run trained with
`tool_format: hermes` saved its template with the Hermes rendering, so it does), and
otherwise through the Hermes text rendering (`finesmith.data.tool_templates`), as
`finesmith eval` renders them for such a model. The reply's calls are read with the
evaluator's parser (`finesmith.evaluate.toolcalls.parse_tool_calls`: `<tool_call>` blocks, or
call-shaped JSON) and returned in the OpenAI shape: `message.tool_calls` with `call_...`
ids and the arguments as a JSON string, `finish_reason: "tool_calls"`. Text before the first
call is the message's `content`.

`tool_choice`: `auto` (default) renders the tools and reads calls; `none` renders no tools
and reads nothing; `required` and a named function constrain the reply to calls in the
template's call format (`finesmith.serve.constrain`): one or more calls to any tool, or one
call to the named one, with arguments valid against the tool's parameter schema.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from finesmith.errors import FinesmithError
from finesmith.evaluate.toolcalls import TOOL_CALL_BLOCK, parse_tool_calls

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_PREFIX = "[TOOL_CALLS]"
JSON_OPENERS = ("{", "[", MISTRAL_PREFIX, "<|python_tag|>")  # how other formats begin a call


@dataclass(frozen=True)
class ToolPlan:
    """The request's tools as the template takes them, the choice, and the call format."""

    tools: list[dict[str, Any]]
    choice: str  # auto | required | function (then `name`)
    name: str | None
    hermes: bool  # calls are written as <tool_call>{json}</tool_call>; else as JSON
    arguments_key: str = "arguments"
    prefix: str | None = None  # a marker before a JSON list of calls (Mistral's [TOOL_CALLS])

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}


def tool_plan(engine: Any, tools: list[dict[str, Any]] | None, tool_choice: Any) -> ToolPlan | None:
    """The plan for a request (None when no tools are rendered: none given, or `tool_choice: none`).

    Raises FinesmithError naming the problem for a `tool_choice` the request cannot have.
    """
    if tool_choice is not None and not (tool_choice in ("auto", "none", "required") or _named(tool_choice)):
        raise FinesmithError("tool_choice must be 'auto', 'none', 'required' or "
                             "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if not tools or tool_choice == "none":
        if tool_choice not in (None, "none", "auto"):
            raise FinesmithError("tool_choice asks for a tool call but the request has no tools")
        return None
    shaped = [{"type": "function", "function": {k: v for k, v in t["function"].items() if v is not None}}
              for t in tools]
    name = _named(tool_choice)
    if name is not None and name not in {t["function"]["name"] for t in shaped}:
        raise FinesmithError(f"tool_choice names the function '{name}', which is not among the tools")
    hermes, key, prefix = call_format(engine.tool_tokenizer())
    choice = "function" if name is not None else (tool_choice or "auto")
    return ToolPlan(shaped, choice, name, hermes, key, prefix)


def _named(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        return name if isinstance(name, str) and name else None
    return None


def call_format(tokenizer: Any) -> tuple[bool, str, str | None]:
    """(hermes, arguments key, list prefix): how the template writes an assistant's call, found
    from a probe render."""
    cached = getattr(tokenizer, "_finesmith_call_format", None)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    from finesmith.data.template import render
    from finesmith.data.tokenize import PROBE_CALL, PROBE_TOOL

    try:
        text = render(tokenizer, PROBE_CALL[:2], tools=[PROBE_TOOL])
    except FinesmithError:
        text = ""
    after = text[text.find("finesmith_probe_call"):]  # the call itself, past the tool schemas
    found = (HERMES_OPEN in text, "parameters" if after.find('"parameters"') >= 0 and (
        after.find('"arguments"') < 0 or after.find('"parameters"') < after.find('"arguments"')) else "arguments",
        MISTRAL_PREFIX if MISTRAL_PREFIX in text else None)
    tokenizer._finesmith_call_format = (tokenizer.chat_template, found)
    return found


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates take them: calls' arguments as dicts, no None content."""
    from finesmith.data.tools import normalise_message

    problems: list[str] = []
    out = [normalise_message(m, i, problems) for i, m in enumerate(messages, start=1)]
    if problems:
        raise FinesmithError(problems[0])
    for m in out:
        if m.get("content") is None:
            m["content"] = ""
        for call in m.get("tool_calls") or []:
            if not call.get("id"):
                call.pop("id", None)
    return out


def call_grammar(engine: Any, plan: ToolPlan) -> str | None:
    """A grammar forcing calls (for `required` or a named function), in the template's call format."""
    if plan.choice not in ("required", "function"):
        return None
    from finesmith.serve.constrain import lark_grammar, lark_json, lark_literal

    tools = [t for t in plan.tools if plan.name is None or t["function"]["name"] == plan.name]
    shapes = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        plan.arguments_key: t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", plan.arguments_key], "additionalProperties": False} for t in tools]
    body = lark_json(shapes[0] if len(shapes) == 1 else {"anyOf": shapes})
    if plan.hermes:
        tokenizer = engine.tokenizer
        call = f'{lark_literal(tokenizer, HERMES_OPEN)} "\\n" body "\\n" {lark_literal(tokenizer, HERMES_CLOSE)}'
        start = "call" if plan.choice == "function" else 'call ("\\n" call)*'
        lark = f"start: {start}\ncall: {call}\nbody: {body}\n"
    elif plan.prefix:  # [TOOL_CALLS][{...}, {...}]
        calls = '"[" body "]"' if plan.choice == "function" else '"[" body ("," body)* "]"'
        lark = f"start: {lark_literal(engine.tokenizer, plan.prefix)} {calls}\nbody: {body}\n"
    else:
        lark = f"start: body\nbody: {body}\n"
    grammar = lark_grammar(lark)
    engine.grammar_tokenizer().check(grammar)
    return grammar


def call_start(text: str) -> int:
    """Where the calls begin in `text` (its length when there are none)."""
    block = TOOL_CALL_BLOCK.search(text)
    if block:
        return block.start()
    stripped = text.lstrip()
    return len(text) - len(stripped) if stripped.startswith(JSON_OPENERS) else len(text)


def split_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls): the reply's calls to the request's tools in the OpenAI shape, and the
    text before them (None when empty). A reply without such calls is all content."""
    start = call_start(text)
    calls = [c for c in parse_tool_calls(text[start:]) if c["name"] in plan.names
             and isinstance(c["arguments"], dict)] if start < len(text) else []
    if not calls:
        return text, []
    content = text[:start]
    return (content if content.strip() else None), [openai_call(c) for c in calls]


def openai_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


class ToolStream:
    """Streams a reply's content while holding back whatever may be a call, to read at the end.

    Text is shown until a call could begin: a `<tool_call>` tag anywhere (a tail that could
    still become one is held), or a JSON call as the very start of the reply. What was held
    is read by `finish`, so the streamed content equals the non-streamed `content`.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan, self.text, self.shown = plan, "", 0

    def feed(self, piece: str) -> str:
        self.text += piece
        stripped = self.text.lstrip()
        if not stripped or any(o.startswith(stripped) or stripped.startswith(o) for o in JSON_OPENERS):
            return ""  # the reply may open with a call: undecided until more text comes
        end = self.text.find(HERMES_OPEN)
        if end < 0:
            end = len(self.text) - _partial_tag(self.text)
        return self._show(max(end, self.shown))

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The content not shown yet, and the calls."""
        content, calls = split_calls(self.text, self.plan)
        if calls:
            return (content or "")[self.shown:], calls
        return self._show(len(self.text)), []

    def _show(self, end: int) -> str:
        out, self.shown = self.text[self.shown:end], end
        return out


def _partial_tag(text: str) -> int:
    """Length of the longest tail of `text` that begins `<tool_call>`."""
    for size in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(HERMES_OPEN[:size]):
            return size
    return 0
