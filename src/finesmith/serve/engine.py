"""One loaded model that streams text, shared by the terminal chat and the HTTP server.

Generation runs `model.generate` in a worker thread that feeds a `TextIteratorStreamer`;
the caller iterates text pieces as they decode. A lock admits one generation at a time,
because one model instance on one device gains nothing from interleaving requests and
the KV caches of parallel calls would only compete for memory.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finesmith.data.tokenize import bos_to_prepend, prompt_ids
from finesmith.errors import FinesmithError
from finesmith.evaluate.generate import stop_token_ids


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: `temperature` 0 means greedy; `stop` strings end the text early."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class StopScanner:
    """Cuts streamed text at the first stop string, never emitting any part of one.

    Text that could still become a stop string (a suffix that is a prefix of one) is held
    back until the next piece decides it.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add decoded text; return what is now safe to show (sets `stopped` on a hit)."""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit_to(min(hits))
        return self._emit_to(len(self.text) - self._pending())

    def flush(self) -> str:
        """The held-back tail once generation has ended without a stop string."""
        return "" if self.stopped else self._emit_to(len(self.text))

    def _pending(self) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _emit_to(self, end: int) -> str:
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted:end], end
        return out


class _Cancel:
    """A stopping criterion the consumer flips to end generation early (stop string, disconnect)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Generation:
    """One streamed generation: iterate for text pieces; afterwards read the outcome."""

    engine: ChatEngine
    prompt: list[int]
    sampling: Sampling
    finish_reason: str | None = None
    completion_tokens: int = 0
    _started: bool = field(default=False, repr=False)

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once")
        self._started = True
        with self.engine.lock:
            yield from self._stream()

    def text(self) -> str:
        """Run to the end and return the whole text."""
        return "".join(self)

    def _stream(self) -> Iterator[str]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        engine = self.engine
        streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = _Cancel()
        result: dict[str, Any] = {}
        ids = torch.tensor([self.prompt], device=engine.device)
        limit = engine.token_budget(self.prompt, self.sampling.max_tokens)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([cancel]), max_new_tokens=limit,
                      eos_token_id=engine.stop_ids, pad_token_id=engine.tokenizer.pad_token_id,
                      **sampling_arguments(self.sampling))

        def work() -> None:
            try:
                result["ids"] = engine.model.generate(**kwargs)
            except BaseException as exc:  # surfaced to the consumer below
                result["error"] = exc
                streamer.end()

        if self.sampling.seed is not None:
            torch.manual_seed(self.sampling.seed)
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        scanner = StopScanner(self.sampling.stop)
        try:
            for piece in streamer:
                if shown := scanner.feed(piece):
                    yield shown
                if scanner.stopped:
                    break
            if tail := scanner.flush():
                yield tail
        finally:
            cancel.event.set()
            worker.join()
        if "error" in result:
            raise result["error"]
        new = result["ids"][0, len(self.prompt):].tolist()
        self.completion_tokens = len(new)
        ended = scanner.stopped or (bool(new) and new[-1] in engine.stop_ids)
        self.finish_reason = "stop" if ended else "length"


class ChatEngine:
    """A model, its tokenizer and the lock that serialises generation.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer with a chat template.
        name: the name clients address it by.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(tokenizer)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.lock = threading.Lock()

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for a conversation, rendered with the model's template plus the assistant header."""
        try:
            return prompt_ids(self.tokenizer, messages)
        except Exception as exc:  # jinja template errors, e.g. a template that forbids some role order
            raise FinesmithError(f"the chat template rejected these messages: {exc}") from None

    def text_ids(self, text: str) -> list[int]:
        """Prompt ids for raw text, with BOS where the tokenizer adds one."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = bos_to_prepend(self.tokenizer)
        return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids

    def token_budget(self, prompt: list[int], max_tokens: int | None) -> int:
        """New tokens allowed: the request's `max_tokens`, capped by what the context has left."""
        room = (self.context_length - len(prompt)) if self.context_length else None
        if room is not None and room < 1:
            raise FinesmithError(f"the prompt has {len(prompt)} tokens and fills the model's context of "
                                 f"{self.context_length}; shorten it")
        wanted = max_tokens or 512
        return min(wanted, room) if room is not None else wanted

    def generate(self, prompt: list[int], sampling: Sampling) -> Generation:
        """A `Generation` to iterate; checks the context budget up front."""
        self.token_budget(prompt, sampling.max_tokens)
        return Generation(self, prompt, sampling)


def sampling_arguments(sampling: Sampling) -> dict[str, Any]:
    """`generate` keyword arguments: greedy at temperature 0, else temperature + nucleus sampling."""
    if sampling.temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}


def load_engine(spec: str, device: str | None = None) -> ChatEngine:
    """Load a run folder (LoRA merged for speed), an exported model folder or any `--model` spec.

    Args:
        spec: run folder, model folder, `.gguf` file or built-in alias.
        device: `cpu`/`cuda`; defaults to CUDA when available.

    Returns:
        A ready `ChatEngine` named after the folder or file.
    """
    from finesmith.model.methods import load_for_inference

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_for_inference(spec, None, device)
    if hasattr(model, "peft_config") and not model.peft_config[model.active_adapter].is_prompt_learning:
        model = model.merge_and_unload()  # same outputs, no adapter overhead per token
    model.eval()
    path = Path(spec)
    name = path.stem if path.suffix.lower() == ".gguf" else (path.name if path.exists() else spec)
    return ChatEngine(model, tokenizer, name)
