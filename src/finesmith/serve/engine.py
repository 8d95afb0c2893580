"""One loaded model that streams text, shared by the terminal chat and the HTTP server.

A single worker thread owns the model and runs one request at a time, in arrival order,
from a bounded queue: one model instance on one device gains nothing from interleaving
requests, and the KV caches of parallel calls would only compete for memory. Callers
never touch the model or a lock held across a generation. They submit a `Generation`
and read its text pieces from its own channel, either by plain iteration (the terminal
chat) or with `async for` on an event loop (the HTTP server), so a slow or idle reader
costs nothing but its queue slot.

A full queue refuses new requests at once (`EngineBusy`) instead of letting them pile up.
A consumer that goes away cancels its generation: a running one stops at the next token,
a waiting one is skipped. `close()` refuses new work, fails everything still waiting and
gives the running request a short grace before stopping it, so a server can exit promptly.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finesmith.core.templates import stop_token_ids
from finesmith.data.tokenize import bos_to_prepend, prompt_ids
from finesmith.errors import FinesmithError

DEFAULT_QUEUE_SIZE = 32
SHUTDOWN_GRACE_S = 2.0  # how long `close()` lets the running request go on before stopping it


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: `temperature` 0 means greedy; `stop` strings end the text early."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class EngineBusy(FinesmithError):
    """The wait queue is full; `retry_after` is a rough number of seconds until there is room."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the server is busy: {waiting} requests are already waiting; retry in {retry_after}s")
        self.retry_after = retry_after


class EngineClosed(FinesmithError):
    """The engine is shutting down and takes no more work."""


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


class _End:
    """The last item on a generation's channel: `error` is None when it ended normally."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Generation:
    """One request: submit it (or just iterate it), read text pieces, then read the outcome.

    `finish_reason` ends as "stop" (end of turn or a stop string), "length" (token budget),
    or "cancelled" (its consumer left, or the engine closed). Pieces are handed over on a
    channel that the worker fills and the consumer drains, by iteration in a thread or by
    `async for` over `pieces()` on an event loop; leaving either early cancels the request.
    """

    def __init__(self, engine: ChatEngine, prompt: list[int], sampling: Sampling) -> None:
        self.engine, self.prompt, self.sampling = engine, prompt, sampling
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self._submitted = False
        self._consumed = False
        self._items: deque[str | _End] = deque()
        self._ready = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    def submit(self) -> Generation:
        """Queue for the worker; raises `EngineBusy` when the queue is full, `EngineClosed` after close."""
        if not self._submitted:
            self.engine._enqueue(self)
            self._submitted = True
        return self

    def cancel(self) -> None:
        """Stop this request: skipped if still waiting, stopped at the next token if running."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        self._claim()
        self.submit()
        try:
            while True:
                with self._ready:
                    while not self._items:
                        self._ready.wait()
                    item = self._items.popleft()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            self.cancel()  # a no-op once finished; stops the worker if the reader left early

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces on the running event loop, without blocking it or any thread."""
        self._claim()
        self.submit()
        with self._ready:
            self._loop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
        wakeup = self._wakeup
        try:
            while True:
                with self._ready:
                    item = self._items.popleft() if self._items else None
                if item is None:
                    wakeup.clear()
                    with self._ready:
                        empty = not self._items
                    if empty:  # anything pushed after this check also sets `wakeup`
                        await wakeup.wait()
                    continue
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            self.cancel()

    def text(self) -> str:
        """Run to the end and return the whole text."""
        return "".join(self)

    async def text_async(self) -> str:
        """Run to the end on the event loop and return the whole text."""
        return "".join([piece async for piece in self.pieces()])

    def _claim(self) -> None:
        if self._consumed:
            raise RuntimeError("a Generation can be iterated once")
        self._consumed = True

    def _push(self, item: str | _End) -> None:
        """Worker side: hand one item to the consumer, waking it wherever it waits."""
        with self._ready:
            self._items.append(item)
            self._ready.notify_all()
            loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # the loop has closed; nobody is reading any more
                pass

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.finish_reason = reason
        self.done.set()
        self._push(_End(error))


def _channel_streamer(tokenizer: Any, generation: Generation, scanner: StopScanner) -> Any:
    """A `generate` streamer that decodes like `TextStreamer` and feeds `generation`'s channel."""
    from transformers import TextStreamer

    class ChannelStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text and not scanner.stopped and (shown := scanner.feed(text)):
                generation._push(shown)

    return ChannelStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class _Halt:
    """A stopping criterion: a stop string was seen, the consumer left, or the engine's grace ran out."""

    def __init__(self, engine: ChatEngine, generation: Generation, scanner: StopScanner) -> None:
        self.engine, self.generation, self.scanner = engine, generation, scanner
        self.interrupted = False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        deadline = self.engine._deadline
        if self.generation.cancelled.is_set() or (deadline is not None and time.monotonic() > deadline):
            self.interrupted = True
        halt = self.scanner.stopped or self.interrupted
        return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """A model, its tokenizer and the one worker thread that runs generations on it.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer with a chat template.
        name: the name clients address it by.
        queue_size: requests allowed to wait while one runs; more raise `EngineBusy`.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if queue_size < 1:
            raise FinesmithError(f"the queue size must be at least 1, not {queue_size}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(tokenizer)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.queue_size = queue_size
        self.counts = {"completed": 0, "cancelled": 0, "skipped": 0, "rejected": 0, "failed": 0}
        self._waiting: deque[Generation] = deque()
        self._state = threading.Condition()
        self._worker: threading.Thread | None = None
        self._running: Generation | None = None
        self._closing = False
        self._deadline: float | None = None
        self._seconds_per_request = 1.0  # running average, for Retry-After

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
        """A `Generation` to submit and read (iterating submits it); checks the context budget up front."""
        self.token_budget(prompt, sampling.max_tokens)
        return Generation(self, prompt, sampling)

    def status(self) -> dict[str, Any]:
        """Queue length, whether a request is running, and the outcome counts so far."""
        with self._state:
            return {"waiting": sum(not g.cancelled.is_set() for g in self._waiting), "queue_size": self.queue_size,
                    "running": self._running is not None, "closing": self._closing, **self.counts}

    def close(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Take no more work, fail what waits, let the running request go on for at most `grace` seconds."""
        with self._state:
            if self._closing:
                return
            self._closing = True
            self._deadline = time.monotonic() + grace
            waiting, self._waiting = list(self._waiting), deque()
            self._state.notify_all()
        for generation in waiting:
            generation._finish("cancelled", EngineClosed("the server is shutting down"))

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to stop after `close()`; True when it has."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return worker is None or not worker.is_alive()

    def _enqueue(self, generation: Generation) -> None:
        with self._state:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) >= self.queue_size:  # requests whose readers left give their slots back
                for gone in [g for g in self._waiting if g.cancelled.is_set()]:
                    self._waiting.remove(gone)
                    self.counts["skipped"] += 1
                    gone._finish("cancelled")
            if len(self._waiting) >= self.queue_size:
                self.counts["rejected"] += 1
                busy = len(self._waiting) + (self._running is not None)
                raise EngineBusy(len(self._waiting), max(1, math.ceil(busy * self._seconds_per_request)))
            self._waiting.append(generation)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="finesmith-generation", daemon=True)
                self._worker.start()
            self._state.notify()

    def _work(self) -> None:
        while True:
            with self._state:
                while not self._waiting and not self._closing:
                    self._state.wait()
                if not self._waiting:
                    return
                generation = self._waiting.popleft()
                self._running = generation
            started = time.monotonic()
            error: BaseException | None = None
            if generation.cancelled.is_set():
                reason, outcome = "cancelled", "skipped"
            else:
                try:
                    reason = self._run(generation)
                    outcome = "completed" if reason in ("stop", "length") else "cancelled"
                except Exception as exc:  # one bad request must not stop the worker
                    reason, outcome, error = "cancelled", "failed", exc
            if outcome == "cancelled" and not generation.cancelled.is_set():
                error = EngineClosed("the server is shutting down")  # stopped by close(), not by its reader
            with self._state:
                self._running = None
                self.counts[outcome] += 1
                if outcome == "completed":
                    self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * (time.monotonic() - started)
            generation._finish(reason, error)

    def _run(self, generation: Generation) -> str:
        """Generate for one request, pushing text as it decodes; return its finish reason."""
        from transformers import StoppingCriteriaList

        sampling, prompt = generation.sampling, generation.prompt
        scanner = StopScanner(sampling.stop)
        halt = _Halt(self, generation, scanner)
        ids = torch.tensor([prompt], device=self.device)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                      streamer=_channel_streamer(self.tokenizer, generation, scanner),
                      stopping_criteria=StoppingCriteriaList([halt]),
                      max_new_tokens=self.token_budget(prompt, sampling.max_tokens),
                      eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                      **sampling_arguments(sampling))
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        new = out[0, len(prompt):].tolist()
        generation.completion_tokens = len(new)
        if scanner.stopped:
            return "stop"
        if new and new[-1] in self.stop_ids:
            reason = "stop"
        elif halt.interrupted:
            return "cancelled"
        else:
            reason = "length"
        if tail := scanner.flush():
            generation._push(tail)
        return reason


def sampling_arguments(sampling: Sampling) -> dict[str, Any]:
    """`generate` keyword arguments: greedy at temperature 0, else temperature + nucleus sampling."""
    if sampling.temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}


def load_engine(spec: str, device: str | None = None, queue_size: int = DEFAULT_QUEUE_SIZE,
                precision: str = "auto") -> ChatEngine:
    """Load a run folder (LoRA merged for speed), an exported model folder or any `--model` spec.

    Args:
        spec: run folder, model folder, `.gguf` file or built-in alias.
        device: `cpu`/`cuda`; defaults to CUDA when available.
        queue_size: requests allowed to wait for the model while one runs.
        precision: model dtype (`auto`: bf16 on CUDA, fp32 on CPU; see `inference_dtype`).

    Returns:
        A ready `ChatEngine` named after the folder or file.
    """
    from finesmith.model.methods import load_for_inference, method_of

    if queue_size < 1:
        raise FinesmithError(f"the queue size must be at least 1, not {queue_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from finesmith.core.device import inference_dtype

    dtype = inference_dtype(precision, device)  # checked before the model loads
    model, tokenizer = load_for_inference(spec, None, device)
    if hasattr(model, "peft_config") and method_of(model).mergeable:
        model = method_of(model).merge(model)  # same outputs, no adapter overhead per token
    model = model.to(dtype).eval()  # cast after merging, so the merge itself is exact in fp32
    path = Path(spec)
    name = path.stem if path.suffix.lower() == ".gguf" else (path.name if path.exists() else spec)
    return ChatEngine(model, tokenizer, name, queue_size)
