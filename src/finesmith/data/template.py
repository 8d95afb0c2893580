"""Chat rendering and the trained spans of a conversation, for any chat template.

Every command that turns a conversation into text comes here: training, `data check`,
evaluation (and its few-shot prompts), export checks, chat and the server. So a
conversation is rendered the same way everywhere, with the same fixes applied:

- **System role.** A template that refuses a `system` message (Gemma 2) gets the system
  text folded into the first user turn (`system + "\\n\\n" + user`, as Gemma 3's own
  template does). A template that silently drops it from a finished conversation
  (Mistral Nemo writes it into the last user turn only when the conversation ends with
  the user) gets it folded into the last user turn, where that template puts it at
  inference. Either way one notice is printed.
- **Thinking.** `thinking: on|off` is installed as a one-line prelude of the chat template
  (`{%- set enable_thinking = ... -%}`), so the run folder's tokenizer, the exported model,
  the GGUF file and the server all ask the model in the shape it was taught.

**Trained spans** come from one rendering of the whole conversation. Templates may rewrite
history (Qwen3 drops the reasoning of earlier turns), move text between turns (Mistral) or
add tokens only at the end (Phi-3.5's EOS), so a turn is not located by rendering prefixes.
Instead, for each assistant turn:

1. the turn is rendered once more with its content, reasoning and tool-call names replaced
   by sentinels; where the two renderings differ is what this turn's data produced;
2. the turn starts where its generation prompt ends: the text the template writes after the
   previous message when asked for an answer (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`,
   `[/INST]`) is found just before the differing region, so text the template opens the
   turn with and the model must produce itself (`<think>\\n`, `[TOOL_CALLS]`) is trained;
3. the turn ends with its first end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `<|end|>`,
   `<end_of_turn>`, EOS, ...), which is trained: the model must learn to stop.

What is trained is exactly what the template renders for that turn. A turn that cannot be
located is refused with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from finesmith.config import THINKING
from finesmith.core.templates import END_OF_TURN_TOKENS
from finesmith.errors import FinesmithError

TEMPLATE_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content")
THINKING_MARKER = "{#- finesmith thinking -#}"
THINKING_SWITCH = "enable_thinking"
SENTINEL_TEXT = "\u2402finesmith sentinel\u2403"
SENTINEL_NAME = "finesmith_sentinel_function"
PROBE_SYSTEM = "finesmith_probe_system"
PROBE_REASONING = "finesmith_probe_reasoning"
EXTRA_END_MARKERS = ("<|eom_id|>",)
THINKING_PRELUDE = re.compile(re.escape(THINKING_MARKER) + r"\{%- set " + THINKING_SWITCH + r" = (true|false) -%\}\n")


def _apply(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
           tools: Sequence[dict[str, Any]] | None) -> str:
    """The template itself, on messages reduced to the fields templates read."""
    import jinja2

    plain = [{k: m[k] for k in TEMPLATE_FIELDS if k in m and m[k] is not None} for m in messages]
    try:
        return tokenizer.apply_chat_template(plain, tools=list(tools) if tools else None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, TypeError, ValueError, IndexError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FinesmithError(f"the model's chat template refused this conversation: {message}") from None


def render(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
           tools: Sequence[dict[str, Any]] | None = None) -> str:
    """The conversation as the model's chat template writes it (system role fitted, see above).

    Raises:
        FinesmithError: the template refuses the conversation (e.g. a role order it forbids).
    """
    fitted, rendered = _fit(tokenizer, messages, add_generation_prompt, tools)
    return rendered if rendered is not None else _apply(tokenizer, fitted, add_generation_prompt, tools)


# --- the system role ---------------------------------------------------------------

def refuses_system(tokenizer: Any) -> bool:
    """Whether the chat template raises on a system message (probed once per template)."""
    template = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_finesmith_refuses_system", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    try:
        _apply(tokenizer, [{"role": "system", "content": PROBE_SYSTEM}, {"role": "user", "content": "hi"}], True, None)
        refused = False
    except FinesmithError:
        refused = True
    tokenizer._finesmith_refuses_system = (template, refused)
    return refused


def fit_messages(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                 tools: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The messages as they are rendered: a system message folded into a user turn where the
    template would refuse or drop it (see the module docstring); otherwise unchanged copies."""
    return _fit(tokenizer, messages, add_generation_prompt, tools)[0]


def _fit(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
         tools: Sequence[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], str | None]:
    """`fit_messages`, with the rendering of the fitted messages when it was made on the way."""
    fitted = [dict(m) for m in messages]
    if not fitted or fitted[0].get("role") != "system" or len(fitted) < 2:
        return fitted, None
    system = fitted[0].get("content") or ""
    users = [i for i, m in enumerate(fitted) if m.get("role") == "user"]
    if not users:
        return fitted, None
    if refuses_system(tokenizer):
        _notice(tokenizer, "system-refused", "note: the model's chat template has no system role; the system text is "
                "written at the start of the first user turn")
        return _fold(fitted, users[0], system), None
    rendered = _apply(tokenizer, fitted, add_generation_prompt, tools) if system.strip() else None
    if rendered is not None and system.strip() not in rendered:
        _notice(tokenizer, "system-dropped", "note: the model's chat template leaves the system text out of a "
                "finished conversation; it is written into the last user turn, where the template puts it when "
                "asking for an answer")
        return _fold(fitted, users[-1], system), None
    return fitted, rendered


def _fold(messages: list[dict[str, Any]], user: int, system: str) -> list[dict[str, Any]]:
    target = dict(messages[user])
    target["content"] = f"{system}\n\n{target.get('content') or ''}" if system.strip() else target.get("content")
    return [target if i == user else m for i, m in enumerate(messages) if i > 0]


def _notice(tokenizer: Any, key: str, text: str) -> None:
    """Print a notice once per tokenizer (one load serves a whole command)."""
    seen = getattr(tokenizer, "_finesmith_notices", None)
    if seen is None:
        seen = set()
        tokenizer._finesmith_notices = seen
    if key not in seen:
        seen.add(key)
        from finesmith.core.console import console

        console.print(text)


# --- thinking ----------------------------------------------------------------------

def has_thinking_switch(tokenizer: Any) -> bool:
    """Whether the chat template reads `enable_thinking` (Qwen3 and its kin)."""
    return THINKING_SWITCH in _own_template(getattr(tokenizer, "chat_template", None) or "")


def install_thinking(tokenizer: Any, thinking: str) -> bool:
    """Fix the template's thinking switch for every later rendering; True when a prelude was installed.

    `auto` leaves the template's own default. `on`/`off` need a template with the switch.

    Raises:
        FinesmithError: an unknown value, or on/off for a template without the switch.
    """
    if thinking not in THINKING:
        raise FinesmithError(f"unknown thinking '{thinking}'; use one of {', '.join(THINKING)}")
    template = getattr(tokenizer, "chat_template", None) or ""
    if thinking == "auto":
        return False
    if not has_thinking_switch(tokenizer):
        raise FinesmithError(f"thinking: {thinking} needs a chat template with a thinking switch ({THINKING_SWITCH}, "
                             "as Qwen3's has); this model's template has none, so remove the setting")
    prelude = f"{THINKING_MARKER}{{%- set {THINKING_SWITCH} = {'true' if thinking == 'on' else 'false'} -%}}\n"
    tokenizer.chat_template = prelude + _own_template(template)
    return True


def installed_thinking(tokenizer: Any) -> str:
    """The thinking setting a tokenizer's template carries (`auto` when none was installed)."""
    found = THINKING_PRELUDE.search(getattr(tokenizer, "chat_template", None) or "")
    return "auto" if found is None else "on" if found.group(1) == "true" else "off"


def _own_template(template: str) -> str:
    """The template without a thinking prelude (wherever another prelude put it)."""
    return THINKING_PRELUDE.sub("", template)


def renders_reasoning(tokenizer: Any) -> bool:
    """Whether the template writes an assistant turn's `reasoning_content` (probed once per template)."""
    template = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_finesmith_reasoning", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    probe = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": "ok", "reasoning_content": PROBE_REASONING}]
    try:
        rendered = PROBE_REASONING in _apply(tokenizer, probe, False, None)
    except FinesmithError:
        rendered = False
    tokenizer._finesmith_reasoning = (template, rendered)
    return rendered


def has_reasoning(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return bool(message.get("reasoning_content")) or (isinstance(content, str) and "</think>" in content)


def without_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message with its reasoning removed (`reasoning_content` and any `<think>` block)."""
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    content = out.get("content")
    if isinstance(content, str) and "</think>" in content:
        out["content"] = content.split("</think>")[-1].lstrip("\n")
    return out


def fit_reasoning(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose reasoning the model is asked in the shape it is taught.

    With `thinking: off` installed, reasoning in the data is removed (the model is asked with
    an empty thinking block, so it must learn to answer directly), with one notice. Reasoning
    as a `reasoning_content` field that the template would silently drop is refused.
    """
    assistants = [m for m in messages if m.get("role") == "assistant"]
    if not any(has_reasoning(m) for m in assistants):
        return list(messages)
    if installed_thinking(tokenizer) == "off":
        _notice(tokenizer, "thinking-off", "note: thinking: off, so the reasoning in the data is left out of "
                "training (the model is asked with an empty thinking block and learns to answer directly)")
        return [without_reasoning(m) if m.get("role") == "assistant" else m for m in messages]
    if any(m.get("reasoning_content") for m in assistants) and not renders_reasoning(tokenizer):
        raise FinesmithError("this example has `reasoning_content`, but the model's chat template does not render "
                             "reasoning (it would be silently dropped); put it in the content as <think>...</think>, "
                             "or remove it")
    return list(messages)


# --- trained spans -------------------------------------------------------------------

def end_markers(tokenizer: Any) -> tuple[str, ...]:
    """Strings that end an assistant turn: the known end-of-turn tokens and EOS."""
    eos = getattr(tokenizer, "eos_token", None)
    return tuple(dict.fromkeys([*END_OF_TURN_TOKENS, *EXTRA_END_MARKERS, *([eos] if eos else [])]))


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, Any]],
                    tools: Sequence[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation once; return the text and the character spans to train on.

    One span per assistant turn (turns with `weight: 0` are rendered but not trained), from
    where its generation prompt ends to the end of its end-of-turn marker (see the module
    docstring). Tool calls are part of the assistant turn (trained); tool results are prompt
    text like any other (never trained).

    Raises:
        FinesmithError: the template refuses the conversation, or a turn cannot be located.
    """
    fitted, text = _fit(tokenizer, fit_reasoning(tokenizer, messages), False, tools)
    text = text if text is not None else _apply(tokenizer, fitted, False, tools)
    spans = []
    for index, message in enumerate(fitted):
        if message.get("role") == "assistant" and message.get("weight", 1) != 0:
            spans.append(_locate_turn(tokenizer, fitted, index, text, tools))
    return text, spans


def _turn_number(messages: Sequence[dict[str, Any]], index: int) -> int:
    return sum(m.get("role") == "assistant" for m in messages[: index + 1])


def _locate_turn(tokenizer: Any, messages: list[dict[str, Any]], index: int, text: str,
                 tools: Sequence[dict[str, Any]] | None) -> tuple[int, int]:
    where = f"assistant turn {_turn_number(messages, index)}"
    start, stop = _changed_region(text, _apply(tokenizer, _with(messages, index, _sentinel(messages[index])), False, tools))
    if start is None:
        raise FinesmithError(f"{where} is not rendered by the model's chat template, so there is nothing to train "
                             "on; give it weight 0 or use a template that renders it")
    begin = _turn_start(tokenizer, messages, index, text, start, tools)
    end = _turn_end(tokenizer, text, stop)
    if end is None:
        raise FinesmithError(f"{where}: the chat template writes no end-of-turn marker after the answer (one of "
                             f"{', '.join(end_markers(tokenizer))}), so the model could not learn to stop; "
                             "use a template that ends each assistant turn")
    return begin, end


def _sentinel(message: dict[str, Any]) -> dict[str, Any]:
    """The message with everything its data contributes replaced by sentinel text."""
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    if isinstance(out.get("content"), str) or out.get("content") is None:
        out["content"] = SENTINEL_TEXT
    if out.get("tool_calls"):
        out["tool_calls"] = [_sentinel_call(call) for call in out["tool_calls"]]
    return out


def _sentinel_call(call: dict[str, Any]) -> dict[str, Any]:
    call = dict(call)
    if isinstance(call.get("function"), dict):
        call["function"] = {**call["function"], "name": SENTINEL_NAME}
    else:
        call["name"] = SENTINEL_NAME
    return call


def _with(messages: list[dict[str, Any]], index: int, message: dict[str, Any]) -> list[dict[str, Any]]:
    return [message if i == index else m for i, m in enumerate(messages)]


def _changed_region(text: str, other: str) -> tuple[int | None, int]:
    """The region of `text` that differs from `other` (common prefix and suffix removed)."""
    if text == other:
        return None, 0
    limit = min(len(text), len(other))
    prefix = 0
    while prefix < limit and text[prefix] == other[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and text[-1 - suffix] == other[-1 - suffix]:
        suffix += 1
    return prefix, len(text) - suffix


def _turn_start(tokenizer: Any, messages: list[dict[str, Any]], index: int, text: str, changed: int,
                tools: Sequence[dict[str, Any]] | None) -> int:
    """Where the generation prompt of turn `index` ends in `text` (at or before `changed`).

    The opening is the text the template writes after the previous message's content when it
    asks for this turn (its closing marker plus the assistant header). Found just before the
    changed region, everything after it is the model's to produce; where the history shows
    only part of it (a rewritten turn), the turn starts at the changed region.
    """
    if index == 0:
        return changed
    previous = index - 1
    asked = messages[:index]
    prompt = _apply(tokenizer, asked, True, tools)
    if len(prompt) <= changed and text.startswith(prompt):
        return len(prompt)  # the history renders as the prompt did: the turn starts where the prompt ends
    marked = _sentinel_content(messages[previous])
    if marked is None:
        return changed
    in_prompt, prompt_end = _changed_region(prompt, _apply(tokenizer, _with(asked, previous, marked), True, tools))
    in_text, text_end = _changed_region(text, _apply(tokenizer, _with(messages, previous, marked), False, tools))
    if in_prompt is None or in_text is None or text_end > changed:
        return changed
    opening = prompt[prompt_end:]
    window = text[text_end:changed]
    found = window.rfind(opening) if opening else -1
    if found >= 0:
        return text_end + found + len(opening)
    return changed


def _sentinel_content(message: dict[str, Any]) -> dict[str, Any] | None:
    if not isinstance(message.get("content"), str):
        return None
    out = dict(message)
    out["content"] = SENTINEL_TEXT
    return out


def _turn_end(tokenizer: Any, text: str, stop: int) -> int | None:
    """The end of the first end-of-turn marker at or after `stop`."""
    found = [(text.find(marker, stop), marker) for marker in end_markers(tokenizer)]
    found = [(at, marker) for at, marker in found if at >= 0]
    if not found:
        return None
    at, marker = min(found, key=lambda item: (item[0], -len(item[1])))
    return at + len(marker)
