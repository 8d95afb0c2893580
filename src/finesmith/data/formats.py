"""Dataset shapes, detected from each row (or chosen in the config), parsed into examples.

Conversational shapes become an `Example` (a list of messages `{"role", "content"[, "weight"]}`):
- chat: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...], "tools"?: [...]}`
  (the hosted fine-tuning API's format; an assistant turn with `"weight": 0` is not trained).
  `content` may be a list of parts (`{"type": "text", "text": ...}`; text parts are joined
  with newlines, other part types are refused: the models finesmith trains read text).
  Assistant turns may call tools (`tool_calls`, or the older `function_call`), answered by
  `tool` messages (`tool_call_id`) or the older `function` role; `tools` (or the older
  `functions`) lists the function schemas. See `finesmith.data.tools`.
- sharegpt: `{"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation", "value": ...}, ...],
  "tools"?: ...}` (a `function_call` turn's value is the call as JSON, an `observation` is its result)
- alpaca: `{"instruction", "input"?, "output"}`
- prompt_completion: `{"prompt", "completion"}`

Two more shapes are distinct example types:
- text: `{"text"}` or a `.txt`/`.md` document, a `TextExample` where every token is trained
- preference: `{"prompt", "chosen", "rejected"}` (strings, or a message list as the prompt
  and `[{"role": "assistant", ...}]` answers), or the hosted fine-tuning API's DPO shape
  `{"input": {"messages"}, "preferred_output", "non_preferred_output"}`: a `PreferenceExample`
  for the preference objectives (`objective: dpo|ipo|orpo|simpo`)
- feedback: `{"prompt", "completion", "label": true|false}`, a `FeedbackExample`: one answer
  marked desirable or not, for `objective: kto`

`fields` maps a canonical field name to the column that holds it in the user's file, e.g.
`{"instruction": "question", "output": "answer"}`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from finesmith.data.load import MAX_DEPTH, Record, iter_records, nesting_depth
from finesmith.data.tools import content_text, normalise_message, normalise_tools, sharegpt_turn, tool_problems
from finesmith.errors import FinesmithError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
FORMATS = ("auto", "chat", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "feedback")
FIELD_NAMES = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion",
               "text", "chosen", "rejected", "tools", "label", "preferred_output", "non_preferred_output")


@dataclass(frozen=True)
class Example:
    """One conversation and where it came from (`file:line`)."""

    messages: tuple[dict[str, Any], ...]
    source: str
    tools: tuple[dict[str, Any], ...] | None = None  # function schemas the conversation may call

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """The conversation up to (not including) the final assistant turn."""
        return list(self.messages[:-1])

    @property
    def answer(self) -> str:
        """The final assistant turn's text: the reference answer in evaluation."""
        return self.messages[-1]["content"]

    @property
    def answer_tool_calls(self) -> list[dict[str, Any]]:
        """`[{"name", "arguments"}]` of the final assistant turn ([] when it calls no tool)."""
        return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in self.messages[-1].get("tool_calls") or []]


@dataclass(frozen=True)
class TextExample:
    """Plain text for language modelling: every token is trained."""

    text: str
    source: str


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt (as messages) with a preferred and a rejected answer."""

    prompt: tuple[dict[str, Any], ...]
    chosen: str
    rejected: str
    source: str


@dataclass(frozen=True)
class FeedbackExample:
    """A prompt (as messages) with one answer marked desirable or not (unpaired feedback)."""

    prompt: tuple[dict[str, Any], ...]
    completion: str
    desirable: bool
    source: str


AnyExample = Example | TextExample | PreferenceExample | FeedbackExample


def detect_format(row: dict[str, Any]) -> str | None:
    """The shape of one row, or None when no known shape fits."""
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if ("chosen" in row and "rejected" in row) or ("preferred_output" in row and "non_preferred_output" in row):
        return "preference"
    if "completion" in row and "label" in row:
        return "feedback"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def apply_fields(row: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """Rename the user's columns to canonical names (`fields`: canonical → column)."""
    if not fields:
        return row
    renamed = dict(row)
    for canonical, column in fields.items():
        if column in renamed:
            renamed[canonical] = renamed.pop(column)
    return renamed


def row_to_example(row: dict[str, Any], where: str, fmt: str = "auto",
                   fields: dict[str, str] | None = None) -> AnyExample:
    """Parse one row into an example, checking everything that makes it untrainable.

    Args:
        row: one JSON object / CSV or Parquet row.
        where: `file:line`, put in front of every problem.
        fmt: a name from FORMATS; `auto` detects it from the row's keys.
        fields: canonical field name → the row's column name.
    Returns:
        An Example, TextExample or PreferenceExample.
    Raises:
        FinesmithError: `where` plus every problem found in the row, joined by `; `.
    """
    row = apply_fields(row, fields or {})
    shape = detect_format(row) if fmt == "auto" else fmt
    if shape is None:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise FinesmithError(
            f"{where}: unrecognised example (keys: {keys}); use `messages`, `conversations`, "
            "`instruction`/`output`, `prompt`/`completion`, `text` or `prompt`/`chosen`/`rejected`, "
            "or map your columns with data.fields")
    return PARSERS[shape](row, where)


def _chat(row: dict[str, Any], where: str) -> Example:
    messages = row.get("messages")
    tools, problems = normalise_tools(row.get("tools", row.get("functions")))
    if isinstance(messages, list):
        messages = [normalise_message(m, i, problems) for i, m in enumerate(messages, start=1)]
    _raise_if(problems + conversation_problems(messages, tools), where)
    return Example(tuple(messages), where, tools)


def _sharegpt(row: dict[str, Any], where: str) -> Example:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise FinesmithError(f"{where}: `conversations` must be a non-empty list of {{from, value}} objects")
    tools, problems = normalise_tools(row.get("tools"))
    messages = []
    for index, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            problems.append(f"turn {index} is not an object; write {{\"from\": ..., \"value\": ...}}")
            continue
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            problems.append(f"turn {index} has unknown role {turn.get('from')!r}; use human, gpt, system, "
                            "function_call or observation")
            continue
        message = sharegpt_turn(turn, role, index, problems)
        if message is not None:
            messages.append(message)
    _raise_if(problems + conversation_problems(messages, tools), where)
    return Example(tuple(messages), where, tools)


def _alpaca(row: dict[str, Any], where: str) -> Example:
    problems = _missing_text(row, ("instruction", "output"), "alpaca")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        problems.append("`input` must be a string")
    _raise_if(problems, where)
    instruction = row["instruction"]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(({"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}), where)


def _prompt_completion(row: dict[str, Any], where: str) -> Example:
    _raise_if(_missing_text(row, ("prompt", "completion"), "prompt_completion"), where)
    return Example(({"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["completion"]}), where)


def _text(row: dict[str, Any], where: str) -> TextExample:
    _raise_if(_missing_text(row, ("text",), "text"), where)
    return TextExample(row["text"], where)


def _preference(row: dict[str, Any], where: str) -> PreferenceExample:
    if "preferred_output" in row:  # the hosted fine-tuning API's DPO shape
        given = row.get("input")
        row = {"prompt": given.get("messages") if isinstance(given, dict) else None,
               "chosen": row.get("preferred_output"), "rejected": row.get("non_preferred_output")}
    prompt, problems = _prompt_messages(row.get("prompt"))
    answers = {key: _answer_text(row.get(key)) for key in ("chosen", "rejected")}
    problems += [f"`{key}` must be a non-empty string (or one assistant message)"
                 for key, text in answers.items() if text is None]
    if not problems and answers["chosen"] == answers["rejected"]:
        problems.append("`chosen` and `rejected` are identical, so there is no preference to learn")
    if not problems:
        problems = message_problems(prompt + [{"role": "assistant", "content": answers["chosen"]}])
    _raise_if(problems, where)
    return PreferenceExample(tuple(prompt), answers["chosen"], answers["rejected"], where)


def _feedback(row: dict[str, Any], where: str) -> FeedbackExample:
    prompt, problems = _prompt_messages(row.get("prompt"))
    completion = _answer_text(row.get("completion"))
    if completion is None:
        problems.append("`completion` must be a non-empty string (or one assistant message)")
    label = row.get("label")
    if not isinstance(label, bool):
        problems.append(f"`label` must be true (desirable) or false (undesirable), got {label!r}")
    if not problems:
        problems = message_problems(prompt + [{"role": "assistant", "content": completion}])
    _raise_if(problems, where)
    return FeedbackExample(tuple(prompt), completion, label, where)


def _prompt_messages(prompt: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """A preference prompt as messages (a string is one user turn), and what is wrong with it."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        problems: list[str] = []
        prompt = [normalise_message(m, i, problems) for i, m in enumerate(prompt, start=1)]
        if problems:
            return [], problems
    if isinstance(prompt, list) and prompt and _text_of(prompt[-1]):
        return prompt, []
    return [], ["`prompt` must be a non-empty string or a list of messages ending with the user's turn"]


def _text_of(message: Any) -> bool:
    return isinstance(message, dict) and isinstance(message.get("content"), str) and bool(message["content"].strip())


def _answer_text(value: Any) -> str | None:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        value = content_text(value[0].get("content"), 1, "assistant", [])
    return value if isinstance(value, str) and value.strip() else None


PARSERS = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca, "prompt_completion": _prompt_completion,
           "text": _text, "preference": _preference, "feedback": _feedback}


def _missing_text(row: dict[str, Any], keys: tuple[str, ...], shape: str) -> list[str]:
    problems = []
    for key in keys:
        value = row.get(key)
        if key not in row:
            problems.append(f"missing `{key}` (format {shape}; map another column to it with data.fields.{key})")
        elif not isinstance(value, str):
            problems.append(f"`{key}` must be a string, got {type(value).__name__}")
        elif not value.strip():
            problems.append(f"`{key}` is empty")
    return problems


def _raise_if(problems: list[str], where: str) -> None:
    if problems:
        raise FinesmithError(f"{where}: " + "; ".join(problems))


def conversation_problems(messages: Any, tools: tuple[dict[str, Any], ...] | None) -> list[str]:
    """`message_problems` plus the tool checks (call ids, known functions, results answered)."""
    problems = message_problems(messages)
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        problems += tool_problems(messages, tools)
    return problems


def message_problems(messages: Any) -> list[str]:
    """Every reason a conversation is not trainable, in message order (empty when fine).

    Checks: a non-empty list of objects, known roles, string content, a system message
    only first, user and assistant alternating from a user turn (tool results between an
    assistant's calls and its next turn), at least one assistant turn, the last turn from
    the assistant, and no empty trained assistant turn (one that calls tools may have no text).
    """
    if not isinstance(messages, list) or not messages:
        return ["`messages` is missing or empty; it must be a non-empty list of {role, content} objects"]
    problems: list[str] = []
    previous = None
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            problems.append(f"message {index} is not an object; write {{\"role\": ..., \"content\": ...}}")
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append(f"message {index} has unknown role {role!r}; use one of {', '.join(ROLES)}")
            continue
        if not isinstance(content, str):
            problems.append(f"message {index} ({role}) has no text `content`; add a string content")
        elif (role == "assistant" and message.get("weight", 1) != 0 and not content.strip()
              and not message.get("tool_calls")):
            problems.append(f"message {index}: empty assistant content; give it the answer text")
        problems += _order_problem(index, role, previous)
        previous = role
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "assistant" not in roles:
        problems.append("no assistant turn, so nothing to learn; add an assistant message")
    elif roles and roles[-1] != "assistant":
        problems.append(f"the last message must be from the assistant, got {roles[-1]!r}")
    return problems


def _order_problem(index: int, role: str, previous: str | None) -> list[str]:
    if role == "system":
        return [] if index == 1 else [f"message {index}: a system message may only come first; move or merge it"]
    if previous in (None, "system"):
        return [] if role == "user" else [f"message {index}: the conversation starts with the {role}; it must start with a user turn"]
    if role == "tool":
        return [] if previous in ("assistant", "tool") else [
            f"message {index}: a tool result must follow the assistant turn that called the tool"]
    if previous == "tool" and role != "assistant":
        return [f"message {index}: tool results must be followed by an assistant turn, got {role!r}"]
    if role == previous:
        return [f"message {index}: two {role} turns in a row; merge them or add the missing turn"]
    return []


def validate_messages(messages: Any, where: str) -> None:
    """Raise one line naming `where` and every problem when a conversation is not trainable."""
    _raise_if(message_problems(messages), where)


def row_to_messages(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Convert one conversational row (chat, ShareGPT, Alpaca, prompt/completion) to messages."""
    example = row_to_example(row, where)
    if not isinstance(example, Example):
        raise FinesmithError(f"{where}: a conversation is needed here, got a {type(example).__name__}")
    return list(example.messages)


def parse_records(path: str, fmt: str = "auto", fields: dict[str, str] | None = None
                  ) -> Iterator[tuple[Record, AnyExample | None, str | None]]:
    """Stream `(record, example, problem)` for a data source; exactly one of example/problem is set
    for rows, both are None for records that only carry a warning.

    Args:
        path: file, folder or hub id (see `finesmith.data.load.iter_records`).
        fmt, fields: as in `row_to_example`.
    """
    for record in iter_records(path):
        if record.problem is not None:
            yield record, None, f"{record.where}: {record.problem}"
        elif record.row is None:
            yield record, None, None
        elif nesting_depth(record.row) > MAX_DEPTH:  # CSV cells, Parquet and hub rows nest too
            yield record, None, f"{record.where}: nested too deeply (over {MAX_DEPTH} levels); flatten the value"
        else:
            try:
                yield record, row_to_example(record.row, record.where, fmt, fields), None
            except FinesmithError as exc:
                yield record, None, str(exc)


def load_examples(path: str, fmt: str = "auto", fields: dict[str, str] | None = None) -> list[AnyExample]:
    """Load every example of a data source, failing on the first bad row with `file:line`."""
    examples = []
    for _, example, problem in parse_records(str(path), fmt, fields):
        if problem:
            raise FinesmithError(problem)
        if example is not None:
            examples.append(example)
    if not examples:
        raise FinesmithError(f"{path}: no examples found; the file is empty")
    return examples
