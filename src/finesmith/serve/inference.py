"""The OpenAI inference endpoints: `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions` (both with `stream: true` as server-sent events).

Handlers never run the model: they submit the request to the engine's single worker and
await its text pieces on the event loop, so no thread waits while someone else's stream
is read. A full wait queue answers 429 with `Retry-After`; a client that disconnects
cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from finesmith.errors import FinesmithError
from finesmith.serve.engine import ChatEngine, EngineBusy, EngineClosed, Generation, Sampling
from finesmith.serve.http import APIError, ClientGone, json_body, parse
from finesmith.serve.registry import ModelRegistry


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # Chat templates know "system"; "developer" is OpenAI's newer name for the same turn.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class Options(BaseModel):
    """Sampling fields shared by both endpoints; unknown fields are ignored like OpenAI's extras."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    stream_options: dict[str, Any] | None = None

    def sampling(self) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        return Sampling(self.max_tokens, self.temperature, self.top_p, tuple(stops), self.seed)


class ChatRequest(Options):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Options):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint


def add_inference_routes(app: FastAPI, registry: ModelRegistry) -> None:
    """The models, chat and completions endpoints on `app`, answering from `registry`'s models."""
    created = int(time.time())

    async def engine_for(name: str) -> ChatEngine:
        if name not in registry:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"{', '.join(repr(n) for n in registry.names())}", param="model",
                           code="model_not_found")
        try:
            return await asyncio.to_thread(registry.engine, name)
        except FinesmithError as exc:
            raise APIError(500, f"the model '{name}' could not be loaded: {exc}", kind="server_error") from None

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": registry.owners.get(name, "finesmith")}
                                           for name in registry.names()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = parse(ChatRequest, await json_body(request))
        engine = await engine_for(req.model)
        if req.max_completion_tokens:
            req.max_tokens = req.max_completion_tokens
        messages = [m.plain() for m in req.messages]
        generation = start(engine, lambda: engine.chat_ids(messages), req.sampling(), "messages")
        reply = Reply("chat.completion", engine.name, len(generation.prompt))
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(reply.chat_events(generation, usage), media_type="text/event-stream")
        return reply.chat(await finish(generation, request), generation)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = parse(CompletionRequest, await json_body(request))
        engine = await engine_for(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request", param="prompt")
        generation = start(engine, lambda: engine.text_ids(prompts[0]), req.sampling(), "prompt")
        reply = Reply("text_completion", engine.name, len(generation.prompt))
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(reply.text_events(generation, usage), media_type="text/event-stream")
        return reply.text(await finish(generation, request), generation)


def start(engine: ChatEngine, render: Any, sampling: Sampling, param: str) -> Generation:
    """Render, budget and queue the prompt; problems become error answers before any streaming.

    A bad prompt is a 400; a full queue is a 429 with `Retry-After`; a closing engine is a 503.
    """
    try:
        generation = engine.generate(render(), sampling)
    except FinesmithError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_prompt") from None
    try:
        return generation.submit()
    except EngineBusy as exc:
        raise APIError(429, str(exc), kind="requests", code="rate_limit_exceeded",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    except EngineClosed as exc:
        raise shutting_down(exc) from None


def shutting_down(exc: Exception) -> APIError:
    return APIError(503, str(exc), kind="server_error", code="server_shutting_down", headers={"Retry-After": "5"})


async def finish(generation: Generation, request: Request) -> str:
    """The whole answer, awaited on the event loop; a client that disconnects cancels its request."""
    answer = asyncio.ensure_future(generation.text_async())
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
            generation.cancel()
    if not answer.done():
        raise ClientGone()
    try:
        return answer.result()
    except EngineClosed as exc:
        raise shutting_down(exc) from None
    except asyncio.CancelledError:
        raise ClientGone() from None
    except Exception as exc:
        raise APIError(500, f"generation failed: {exc}", kind="server_error") from None


async def disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Reply:
    """Builds OpenAI response bodies and stream chunks for one request."""

    def __init__(self, kind: str, model: str, prompt_tokens: int) -> None:
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        self.id, self.kind, self.model = f"{prefix}-{uuid.uuid4().hex}", kind, model
        self.created, self.prompt_tokens = int(time.time()), prompt_tokens

    def usage(self, generation: Generation) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": generation.completion_tokens,
                "total_tokens": self.prompt_tokens + generation.completion_tokens}

    def envelope(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def chat(self, text: str, generation: Generation) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": generation.finish_reason, "logprobs": None}
        return self.envelope("chat.completion", [choice], usage=self.usage(generation))

    def text(self, text: str, generation: Generation) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "finish_reason": generation.finish_reason, "logprobs": None}
        return self.envelope("text_completion", [choice], usage=self.usage(generation))

    async def chat_events(self, generation: Generation, usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return self.envelope("chat.completion.chunk", [choice])

        yield sse(chunk({"role": "assistant", "content": ""}, None))
        async for event in self._stream(generation, lambda piece: chunk({"content": piece}, None),
                                        lambda: chunk({}, generation.finish_reason), "chat.completion.chunk",
                                        usage):
            yield event

    async def text_events(self, generation: Generation, usage: bool) -> AsyncIterator[str]:
        def chunk(piece: str, finish: str | None) -> dict[str, Any]:
            return self.envelope("text_completion", [{"index": 0, "text": piece, "finish_reason": finish,
                                                      "logprobs": None}])

        async for event in self._stream(generation, lambda piece: chunk(piece, None),
                                        lambda: chunk("", generation.finish_reason), "text_completion", usage):
            yield event

    async def _stream(self, generation: Generation, piece_chunk: Any, final_chunk: Any, kind: str,
                      usage: bool) -> AsyncIterator[str]:
        # Starlette cancels this stream when the client disconnects; leaving `pieces()` cancels the request.
        try:
            async for piece in generation.pieces():
                yield sse(piece_chunk(piece))
        except EngineClosed as exc:  # headers are already sent: report in-band, as OpenAI does
            yield sse(shutting_down(exc).body())
            return
        except Exception as exc:
            yield sse(APIError(500, f"generation failed: {exc}", kind="server_error").body())
            return
        yield sse(final_chunk())
        if usage:
            yield sse(self.envelope(kind, [], usage=self.usage(generation)))
        yield "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
