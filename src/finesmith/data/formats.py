"""Dataset shapes, detected from each row, all converted to one chat form.

Every supported shape becomes a list of messages `{"role", "content"[, "weight"]}`:
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`
  (the OpenAI fine-tuning format; an assistant turn with `"weight": 0` is not trained)
- alpaca: `{"instruction", "input"?, "output"}`
- prompt_completion: `{"prompt", "completion"}`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finesmith.data.load import read_jsonl
from finesmith.errors import FinesmithError

ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "alpaca", "prompt_completion")


@dataclass(frozen=True)
class Example:
    """One conversation and where it came from (`file:line`)."""

    messages: tuple[dict[str, Any], ...]
    source: str

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """The conversation up to (not including) the final assistant turn."""
        return list(self.messages[:-1])

    @property
    def answer(self) -> str:
        """The final assistant turn: the reference answer in evaluation."""
        return self.messages[-1]["content"]


def detect_format(row: dict[str, Any]) -> str | None:
    if "messages" in row:
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def row_to_messages(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Convert one row of any supported shape to validated chat messages."""
    fmt = detect_format(row)
    if fmt == "chat":
        messages = row["messages"]
    elif fmt == "alpaca":
        instruction = _text_field(row, "instruction", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise FinesmithError(f"{where}: `input` must be a string")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text_field(row, "output", where)}]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text_field(row, "prompt", where)},
                    {"role": "assistant", "content": _text_field(row, "completion", where)}]
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise FinesmithError(
            f"{where}: unrecognised example (keys: {keys}); use `messages`, "
            "`instruction`/`output` or `prompt`/`completion`")
    validate_messages(messages, where)
    return messages


def _text_field(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise FinesmithError(f"{where}: `{key}` must be a string, got {type(value).__name__}")
    return value


def validate_messages(messages: Any, where: str) -> None:
    """Check a conversation is trainable: known roles, text content, ends with the assistant."""
    if not isinstance(messages, list) or not messages:
        raise FinesmithError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        at = f"{where}: message {index + 1}"
        if not isinstance(message, dict):
            raise FinesmithError(f"{at} is not an object; write {{\"role\": ..., \"content\": ...}}")
        role = message.get("role")
        if role not in ROLES:
            raise FinesmithError(f"{at} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise FinesmithError(f"{at} ({role}) has no text `content`; add a string content")
        if role == "system" and index != 0:
            raise FinesmithError(f"{at}: a system message may only come first; move or merge it")
    if not any(m["role"] == "assistant" for m in messages):
        raise FinesmithError(f"{where}: no assistant turn, so nothing to learn; add an assistant message")
    if messages[-1]["role"] != "assistant":
        raise FinesmithError(f"{where}: the last message must be from the assistant, got {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise FinesmithError(f"{where}: the final assistant message is empty; give it the answer text")


def load_examples(path: str | Path) -> list[Example]:
    """Load every example of a JSONL file, failing on the first bad line with `file:line`."""
    examples = [Example(tuple(row_to_messages(row, f"{path}:{n}")), f"{path}:{n}")
                for n, row in read_jsonl(path)]
    if not examples:
        raise FinesmithError(f"{path}: no examples found; the file is empty")
    return examples

