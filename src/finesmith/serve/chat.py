"""`finesmith chat`: a terminal conversation with streamed answers.

Input is read line by line (so a pipe can drive it, not only a keyboard); `/reset`
starts over (keeping the system prompt) and `/exit` or end of input quits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TextIO

from finesmith.errors import FinesmithError
from finesmith.serve.engine import ChatEngine, Sampling

HELP = "type a message; /reset starts over, /exit quits"


def chat_loop(engine: ChatEngine, lines: Iterable[str], out: TextIO, system: str | None = None,
              sampling: Sampling = Sampling(), prompt: str = "") -> list[dict[str, str]]:
    """Answer each input line in turn, streaming the reply to `out`.

    Args:
        engine: the loaded model.
        lines: user input, one message per line.
        out: where replies (and the optional `prompt`) are written.
        system: system prompt placed before every conversation.
        sampling: generation settings.
        prompt: text shown before each input (for an interactive terminal).

    Returns:
        The conversation as it stood when the loop ended.
    """
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    out.write(prompt)
    out.flush()
    for line in lines:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            out.write("(conversation cleared)\n")
        elif text:
            history = reply(engine, history, text, out, sampling)
        out.write(prompt)
        out.flush()
    return history


def reply(engine: ChatEngine, history: list[dict[str, str]], text: str, out: TextIO,
          sampling: Sampling) -> list[dict[str, str]]:
    """Stream one answer; return the history with the exchange added (unchanged on error)."""
    conversation = history + [{"role": "user", "content": text}]
    try:
        generation = engine.generate(engine.chat_ids(conversation), sampling)
    except FinesmithError as exc:
        out.write(f"({exc}; /reset starts over)\n")
        return history
    pieces = []
    for piece in generation:
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return conversation + [{"role": "assistant", "content": "".join(pieces).strip()}]


def run_chat(spec: str, system: str | None, sampling: Sampling, stdin: TextIO, stdout: TextIO,
             err: TextIO, precision: str = "auto") -> None:
    """Load the model and chat over the given streams (`finesmith chat`)."""
    from finesmith.serve.engine import load_engine

    engine = load_engine(spec, precision=precision)
    interactive = stdin.isatty()
    err.write(f"chatting with {engine.name}; {HELP}\n")
    chat_loop(engine, iter(stdin.readline, ""), stdout, system, sampling, "you> " if interactive else "")
