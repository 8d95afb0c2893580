"""One loaded model that streams text, shared by the terminal chat and the HTTP server.

A single worker thread owns the model. It takes the requests waiting in a bounded queue,
up to `max_batch` at a time in arrival order, and generates them together
(`finesmith.serve.batch`: one prefill, then one forward pass per token for every live row
over a shared KV cache), so requests that arrive together cost little more than one.
Callers never touch the model or a lock held across a generation. They submit a `Generation`
and read its text pieces from its own channel, either by plain iteration (the terminal
chat) or with `async for` on an event loop (the HTTP server), so a slow or idle reader
costs nothing but its queue slot.

A full queue refuses new requests at once (`EngineBusy`) instead of letting them pile up.
A consumer that goes away cancels its generation: a running one stops at the next token,
a waiting one is skipped. `close()` refuses new work, fails everything still waiting and
gives the running request a short grace before stopping it, so a server can exit promptly.

Several served names may share one engine: LoRA fine-tunes of one base are views
(`finesmith.serve.adapters.AdapterView`) that queue on the base's `SharedBase` engine, each
request keeping its view's tokenizer and stop tokens and running on its view's adapter.
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
DEFAULT_MAX_BATCH = 16  # requests generated together
SHUTDOWN_GRACE_S = 2.0  # how long `close()` lets the running request go on before stopping it


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: `temperature` 0 means greedy; `stop` strings end the text early.

    `logprobs` (a count of alternatives, 0 for none) records each generated token's
    log-probability; `echo` records the prompt's too; `grammar` (compiled by
    `finesmith.serve.constrain`) limits the tokens to what it allows. `max_tokens` 0 generates
    nothing (with `echo`, the prompt's log-probabilities are the answer).
    """

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    grammar: str | None = None


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
        self.tokens: list[int] = []  # the generated token ids, once finished
        self.records: list[Any] = []  # per generated token, when `sampling.logprobs` is set (filled as it decodes)
        self.prompt_records: list[Any] = []  # per prompt token, when `sampling.echo` is set
        self.batch_size = 0  # requests generated together with this one (itself included)
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


class ChatEngine:
    """A model, its tokenizer and the one worker thread that runs generations on it.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer with a chat template.
        name: the name clients address it by.
        queue_size: requests allowed to wait while one runs; more raise `EngineBusy`.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, queue_size: int = DEFAULT_QUEUE_SIZE,
                 max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if queue_size < 1:
            raise FinesmithError(f"the queue size must be at least 1, not {queue_size}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(tokenizer)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.queue_size, self.max_batch = queue_size, max(1, max_batch)
        self.counts = {"completed": 0, "cancelled": 0, "skipped": 0, "rejected": 0, "failed": 0, "largest_batch": 0}
        self._waiting: deque[Generation] = deque()
        self._state = threading.Condition()
        self._worker: threading.Thread | None = None
        self._running: list[Generation] = []  # the batch being generated
        self._closing = False
        self._deadline: float | None = None
        self._seconds_per_request = 1.0  # running average, for Retry-After
        self._grammar_tokenizer: Any = None
        self._tool_tokenizer: Any = None
        self._lazy = threading.Lock()

    def chat_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids for a conversation, rendered with the model's template plus the assistant header
        (with `tools`, calls or tool results: by the template when it renders tools, else in the
        Hermes text format)."""
        tool_turns = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
        try:
            return prompt_ids(self.tool_tokenizer() if tools or tool_turns else self.tokenizer, messages, tools or None)
        except Exception as exc:  # jinja template errors, e.g. a template that forbids some role order
            raise FinesmithError(f"the chat template rejected these messages: {exc}") from None

    def tool_tokenizer(self) -> Any:
        """The tokenizer that renders tools: the model's own when its template renders them (a
        run trained with `tool_format: hermes` saved its template so), else a copy with the
        Hermes text rendering installed, as `finesmith eval` renders tools for such a model."""
        with self._lazy:
            if self._tool_tokenizer is None:
                import copy

                from finesmith.data.tool_templates import install_tool_format

                tokenizer = copy.copy(self.tokenizer)
                self._tool_tokenizer = tokenizer if install_tool_format(tokenizer, "hermes") else self.tokenizer
            return self._tool_tokenizer

    def grammar_tokenizer(self) -> Any:
        """The constrained-decoding view of the tokenizer (built on first use)."""
        with self._lazy:
            if self._grammar_tokenizer is None:
                from finesmith.serve.constrain import GrammarTokenizer

                size = int(getattr(self.model.config, "vocab_size", 0) or 0)
                self._grammar_tokenizer = GrammarTokenizer(self.tokenizer, size, self.stop_ids)
            return self._grammar_tokenizer

    def text_ids(self, text: str) -> list[int]:
        """Prompt ids for raw text, with BOS where the tokenizer adds one."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = bos_to_prepend(self.tokenizer)
        return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids

    def token_budget(self, prompt: list[int], max_tokens: int | None) -> int:
        """New tokens allowed: the request's `max_tokens`, capped by what the context has left."""
        room = (self.context_length - len(prompt)) if self.context_length else None
        if room is not None and (room < 1 if max_tokens != 0 else room < 0):
            raise FinesmithError(f"the prompt has {len(prompt)} tokens and fills the model's context of "
                                 f"{self.context_length}; shorten it")
        wanted = 512 if max_tokens is None else max_tokens
        return min(wanted, room) if room is not None else wanted

    def generate(self, prompt: list[int], sampling: Sampling) -> Generation:
        """A `Generation` to submit and read (iterating submits it); checks the context budget up front."""
        self.token_budget(prompt, sampling.max_tokens)
        return Generation(self, prompt, sampling)

    def status(self) -> dict[str, Any]:
        """Queue length, whether a request is running, and the outcome counts so far."""
        with self._state:
            return {"waiting": sum(not g.cancelled.is_set() for g in self._waiting), "queue_size": self.queue_size,
                    "running": len(self._running), "closing": self._closing, **self.counts}

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
                waves = math.ceil((len(self._waiting) + len(self._running)) / self.max_batch)
                raise EngineBusy(len(self._waiting), max(1, math.ceil(waves * self._seconds_per_request)))
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
                batch: list[Generation] = []
                passed: list[Generation] = []  # requests that must wait for a later batch
                while self._waiting and len(batch) < self.max_batch:
                    g = self._waiting.popleft()
                    (batch if not batch or self._fits(batch, g) else passed).append(g)
                self._waiting.extendleft(reversed(passed))
                self._running = batch
                self.counts["largest_batch"] = max(self.counts["largest_batch"], len(batch))
                for g in batch:
                    g.batch_size = len(batch)
            started = time.monotonic()
            live = [g for g in batch if not g.cancelled.is_set()]
            results: dict[int, tuple[str, str, BaseException | None]] = {
                id(g): ("cancelled", "skipped", None) for g in batch if g.cancelled.is_set()}
            try:
                reasons = self._run(live) if live else {}
                for g in live:
                    reason, error = reasons[id(g)]
                    if reason == "interrupted":  # stopped by close(), not by its reader
                        results[id(g)] = ("cancelled", "cancelled", EngineClosed("the server is shutting down"))
                    elif reason == "error":  # this request alone failed
                        results[id(g)] = ("error", "failed", error)
                    else:
                        results[id(g)] = (reason, "completed" if reason in ("stop", "length") else "cancelled", None)
            except Exception as exc:  # one bad batch must not stop the worker
                for g in live:
                    results[id(g)] = ("cancelled", "failed", exc)
            with self._state:
                self._running = []
                for g in batch:
                    self.counts[results[id(g)][1]] += 1
                if live and all(results[id(g)][1] == "completed" for g in live):
                    self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * (time.monotonic() - started)
            for g in batch:
                reason, _, error = results[id(g)]
                g._finish(reason, error)

    def _fits(self, batch: list[Generation], generation: Generation) -> bool:
        """Whether `generation` may join `batch` (a shared base limits the adapters one batch holds)."""
        return True

    def _adapter_for(self, generation: Generation) -> str | None:
        """The adapter a request runs on in this engine's model; None: the model as it is."""
        return None

    def _run(self, generations: list[Generation]) -> dict[int, tuple[str, BaseException | None]]:
        """Generate for a batch of requests, pushing each one's text as it decodes; their finish
        reasons (`error` with its exception for a request whose own set-up or decoding failed).

        A request's tokenizer, stop tokens and grammar come from the engine it was made by
        (`g.engine`: this one, or a fine-tune's view of a shared base), its adapter from
        `_adapter_for`."""
        from finesmith.serve.batch import Row, choose, decode_batch, prompt_logprobs, row_generator, step

        rows, done, scanners, outcome = [], [], {}, {}
        for g in generations:
            served, adapter = g.engine, self._adapter_for(g)
            try:
                scanner = StopScanner(g.sampling.stop)

                def emit(piece: str, g: Generation = g, scanner: StopScanner = scanner) -> bool:
                    if not scanner.stopped and (shown := scanner.feed(piece)):
                        g._push(shown)
                    return not scanner.stopped

                last: list[torch.Tensor] = []  # an echo row's next-token logits, from its own forward
                if g.sampling.echo:
                    g.prompt_records = prompt_logprobs(self.model, g.prompt, g.sampling.logprobs or 0, last, adapter)
                grammar = (served.grammar_tokenizer().matcher(g.sampling.grammar)
                           if g.sampling.grammar is not None else None)
                row = Row(g.prompt, self.token_budget(g.prompt, g.sampling.max_tokens), g.sampling.temperature,
                          g.sampling.top_p, row_generator(g.sampling.seed, self.device), emit, g.cancelled.is_set,
                          logprobs=g.sampling.logprobs, grammar=grammar, adapter=adapter,
                          tokenizer=served.tokenizer, stop_ids=set(served.stop_ids))
                row.records = g.records  # shared: a streaming reader sees each token's entry as it comes
            except Exception as exc:  # one request's bad set-up fails that request only
                outcome[id(g)] = ("error", exc)
                continue
            scanners[id(g)] = scanner
            if row.budget == 1 and last:  # lm-eval's loglikelihood (echo, max_tokens 1): its one token is ready
                try:
                    row.reason = step(row.tokenizer, row, choose(last[0], row), row.stop_ids) or "length"
                except Exception as exc:
                    row.reason, row.error = "error", exc
                done.append((g, row))
            elif row.budget > 0:
                rows.append((g, row))
            else:
                outcome[id(g)] = ("length", None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        if rows:
            decode_batch(self.model, self.tokenizer, [row for _, row in rows], set(self.stop_ids), pad,
                         lambda: self._deadline)
        for g, row in rows + done:
            scanner = scanners[id(g)]
            g.completion_tokens, g.tokens = len(row.tokens), list(row.tokens)
            if row.reason in ("stop", "length") and not scanner.stopped and (tail := scanner.flush()):
                g._push(tail)
            outcome[id(g)] = ("stop" if scanner.stopped and row.reason != "error" else row.reason, row.error)
        return outcome


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
    return ChatEngine(model, tokenizer, served_name(spec), queue_size)


def served_name(spec: str) -> str:
    """What clients call a model: the file stem of a `.gguf`, a folder's name, else the spec."""
    path = Path(spec)
    return path.stem if path.suffix.lower() == ".gguf" else (path.name if path.exists() else spec)
