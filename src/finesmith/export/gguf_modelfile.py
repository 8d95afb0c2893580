"""An Ollama `Modelfile` for an exported GGUF: the chat format and the stop tokens.

Ollama renders prompts with a Go template, not with the Jinja chat template in the file, so
the Modelfile states the run's chat format in Go template syntax. Rather than keeping one
hand-written template per family, the format is *measured*: probe conversations are rendered
the way finesmith renders them for training (system role fitted, thinking setting applied),
and the text around each message's content is read off. Most templates write every message
as `prefix + content + suffix` by role, with optional fixed text when there is no system
message (a default system prompt, Llama 3's date header) and a generation prompt at the end.
The system text is either a block of its own or folded into the first user turn (Gemma) or
the last one (Mistral Nemo), with a separator. That model is checked on more conversations
(one to three user turns, with and without a system message) against the real renderings,
and written as a Go template only when it reproduces every one of them; otherwise the
Modelfile says so and leaves the template out rather than state a wrong one.

A leading BOS is left out of the template when the tokenizer adds it by itself: Ollama adds
it then too (`tokenizer.ggml.add_bos_token`), as finesmith does for a prompt.

Every token the run stops at becomes a `PARAMETER stop` line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finesmith.errors import FinesmithError

SYSTEM, USERS, ANSWERS = "FSMSYSTEMQX", ("FSMUSERAQX", "FSMUSERBQX", "FSMUSERCQX"), ("FSMANSWERAQX", "FSMANSWERBQX")


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as text around each message's content.

    Attributes:
        no_system: written first when the conversation has no system message.
        user, assistant: (prefix, suffix) around a message's content.
        generation: written after the last message (the assistant header).
        system: (prefix, suffix) of a system block, or the separator of a folded system text.
        fold: "" (a block of its own), "first" or "last" (folded into that user turn).
    """

    no_system: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    system: tuple[str, str] = ("", "")
    fold: str = ""

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt this format writes, exactly as the Go template of `go_template` does."""
        system = ([m["content"] for m in messages if m["role"] == "system"] or [""])[-1] or None
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        target = (users[0] if self.fold == "first" else users[-1]) if users and self.fold else -1
        out = [self.no_system if system is None else ""]
        for index, message in enumerate(messages):
            content = message["content"]
            if message["role"] == "system":
                out.append("" if self.fold else self.system[0] + content + self.system[1])
            elif message["role"] == "user":
                folded = system + self.system[0] if index == target and system is not None else ""
                out.append(self.user[0] + folded + content + self.user[1])
            elif message["role"] == "assistant":
                out.append(self.assistant[0] + content + self.assistant[1])
        return "".join(out) + self.generation

    def go_template(self) -> str:
        """The format as an Ollama (Go text/template) TEMPLATE body.

        Actions follow each other with no text between them, and none trims whitespace
        (`{{-`), so the only text written is the measured text.
        """
        text = go_literal
        parts = ['{{ $system := "" }}{{ $target := -1 }}',
                 '{{ range $i, $m := .Messages }}{{ if eq $m.Role "system" }}{{ $system = $m.Content }}{{ end }}'
                 '{{ end }}']
        if self.fold:
            first = "{{ if lt $target 0 }}{{ $target = $i }}{{ end }}" if self.fold == "first" else \
                "{{ $target = $i }}"
            parts.append('{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}' + first + '{{ end }}{{ end }}')
        if self.no_system:
            parts.append('{{ if not $system }}' + text(self.no_system) + '{{ end }}')
        if self.fold:
            system = '{{ if eq $m.Role "system" }}'
            folded = '{{ if and $system (eq $i $target) }}{{ $system }}' + text(self.system[0]) + '{{ end }}'
        else:
            system = '{{ if eq $m.Role "system" }}' + text(self.system[0]) + '{{ $m.Content }}' + text(self.system[1])
            folded = ""
        parts.append('{{ range $i, $m := .Messages }}' + system
                     + '{{ else if eq $m.Role "user" }}' + text(self.user[0]) + folded + '{{ $m.Content }}'
                     + text(self.user[1])
                     + '{{ else if eq $m.Role "assistant" }}' + text(self.assistant[0]) + '{{ $m.Content }}'
                     + text(self.assistant[1]) + '{{ end }}{{ end }}')
        parts.append(text(self.generation))
        return "".join(parts)


def go_literal(text: str) -> str:
    """Literal text inside a Go template: `{{` must be written as an action."""
    return text.replace("{{", '{{ "{{" }}')


# --- measuring a template ---------------------------------------------------------------

def probe(render: Any, messages: list[dict[str, str]]) -> str | None:
    try:
        return render(messages)
    except FinesmithError:
        return None


def between(text: str, before: str, after: str) -> str | None:
    """The text between the first `before` and the next `after` (or the end / start)."""
    start = text.find(before) + len(before) if before else 0
    if before and start < len(before):
        return None
    end = text.find(after, start) if after else len(text)
    return text[start:end] if end >= 0 else None


def inside_marker(text: str, at: int, markers: tuple[str, ...]) -> tuple[int, int] | None:
    """The (start, end) of a marker token occurrence that position `at` cuts, if any."""
    for marker in markers:
        start = text.find(marker, max(0, at - len(marker) + 1))
        while 0 <= start < at:
            if start + len(marker) > at:
                return start, start + len(marker)
            start = text.find(marker, start + 1)
    return None


def common_prefix(a: str, b: str, markers: tuple[str, ...]) -> str:
    """The longest common prefix that does not end inside a marker token of either text."""
    size = 0
    while size < min(len(a), len(b)) and a[size] == b[size]:
        size += 1
    for text in (a, b):
        cut = inside_marker(text, size, markers)
        size = cut[0] if cut else size
    return a[:size]


def common_suffix(a: str, b: str, markers: tuple[str, ...]) -> str:
    """The longest common suffix that does not start inside a marker token of either text."""
    size = 0
    while size < min(len(a), len(b)) and a[-1 - size] == b[-1 - size]:
        size += 1
    for text in (a, b):
        cut = inside_marker(text, len(text) - size, markers)
        size = len(text) - cut[1] if cut else size
    return a[len(a) - size:]


def measure(render: Any, markers: tuple[str, ...] = ()) -> list[ChatFormat]:
    """Candidate formats read off the renderings of a few probe conversations (unchecked).

    `render(messages, generation)` renders with or without the generation prompt. The text
    between two contents is cut into one message's suffix and the next one's prefix either
    where a conversation that ends there (rendered without the generation prompt) stops
    being the same (`<|im_end|>\n` | `<|im_start|>assistant\n`), or where the text before
    the first user message stops being the same; never inside a marker token.
    """
    user, answer = {"role": "user", "content": USERS[0]}, {"role": "assistant", "content": ANSWERS[0]}
    turns = [user, answer, {"role": "user", "content": USERS[1]}]
    plain = probe(render, turns)
    ends = [probe(lambda m: render(m, False), conversation) for conversation in ([user], [user, answer])]
    if plain is None:
        return []
    head, to_answer = between(plain, "", USERS[0]), between(plain, USERS[0], ANSWERS[0])
    to_user, tail = between(plain, ANSWERS[0], USERS[1]), between(plain, USERS[1], "")
    if None in (head, to_answer, to_user, tail):
        return []
    user_end = between(ends[0], USERS[0], "") if ends[0] else None
    answer_end = between(ends[1], ANSWERS[0], "") if ends[1] else None
    user_suffixes = [common_prefix(to_answer, end, markers) for end in (user_end, tail) if end is not None]
    answer_suffixes = [common_prefix(to_user, answer_end, markers)] if answer_end is not None else []
    answer_suffixes.append(to_user[:len(to_user) - len(common_suffix(head, to_user, markers))])
    bases = []
    for user_suffix in dict.fromkeys(user_suffixes):
        for answer_suffix in dict.fromkeys(answer_suffixes):
            user_prefix = to_user[len(answer_suffix):]
            if head.endswith(user_prefix) and tail.startswith(user_suffix):
                bases.append(dict(no_system=head[:len(head) - len(user_prefix)], user=(user_prefix, user_suffix),
                                  assistant=(to_answer[len(user_suffix):], answer_suffix),
                                  generation=tail[len(user_suffix):]))
    with_system = probe(render, [{"role": "system", "content": SYSTEM}] + turns)
    candidates = []
    for base in bases:
        candidates.append(ChatFormat(**base))
        if with_system is None or with_system.count(SYSTEM) != 1:
            continue
        before, after = with_system.split(SYSTEM, 1)
        user_prefix = base["user"][0]
        block_end = between(after, "", USERS[0])
        if block_end is not None and block_end.endswith(user_prefix):
            candidates.append(ChatFormat(**base, system=(before, block_end[:len(block_end) - len(user_prefix)])))
        for fold, target in (("first", USERS[0]), ("last", USERS[1])):
            separator = between(after, "", target)
            if separator is not None and before.endswith(user_prefix):
                candidates.append(ChatFormat(**base, system=(separator, ""), fold=fold))
    return candidates


CHECKS = (
    [{"role": "user", "content": USERS[0]}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USERS[0]}],
    [{"role": "user", "content": USERS[0]}, {"role": "assistant", "content": ANSWERS[0]},
     {"role": "user", "content": USERS[1]}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USERS[0]},
     {"role": "assistant", "content": ANSWERS[0]}, {"role": "user", "content": USERS[1]},
     {"role": "assistant", "content": ANSWERS[1]}, {"role": "user", "content": USERS[2]}],
)


def chat_format(tokenizer: Any) -> tuple[ChatFormat | None, str]:
    """The run's chat format as prefix/suffix text, checked; or None and the reason.

    Returns:
        `(format, "")` when the format reproduces finesmith's rendering of every check
        conversation, else `(None, why)`.
    """
    from finesmith.data.tokenize import bos_to_prepend, render

    bos = tokenizer.bos_token if bos_to_prepend(tokenizer) is not None else None

    def rendered(messages: list[dict[str, str]], generation: bool = True) -> str:
        text = render(tokenizer, messages, add_generation_prompt=generation)
        return text[len(bos):] if bos and text.startswith(bos) else text

    markers = tuple(t.content for t in tokenizer.added_tokens_decoder.values())
    expected = [probe(rendered, list(c)) for c in CHECKS]
    for candidate in measure(rendered, markers):
        if all(e is None or candidate.render(list(c)) == e for c, e in zip(CHECKS, expected)):
            if '"""' in candidate.go_template():
                return None, 'the chat format contains """, which a Modelfile TEMPLATE cannot hold'
            return candidate, ""
    return None, "the chat template is not a fixed text around each message"


# --- the Modelfile ----------------------------------------------------------------------

def modelfile_text(tokenizer: Any, gguf_name: str, stops: list[int]) -> str:
    """The Modelfile for `gguf_name` (in the same folder), its template and stop tokens."""
    lines = [f"# Ollama: ollama create NAME -f Modelfile (run in this folder), then ollama run NAME",
             f"FROM ./{gguf_name}"]
    found, why = chat_format(tokenizer)
    if found is None:
        lines.append(f"# No TEMPLATE: {why}; Ollama will not render this model's chat format by itself.")
    else:
        lines.append(f'TEMPLATE """{found.go_template()}"""')
    for text in dict.fromkeys(tokenizer.convert_ids_to_tokens(stops)):
        lines.append(f"PARAMETER stop {json.dumps(text, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, tokenizer: Any, gguf_name: str, stops: list[int]) -> Path:
    """Write `folder/Modelfile` next to the GGUF file `gguf_name`; returns its path."""
    path = Path(folder) / "Modelfile"
    path.write_text(modelfile_text(tokenizer, gguf_name, stops), encoding="utf-8")
    return path
