"""`finesmith serve`: an OpenAI-compatible HTTP API over one fine-tuned model.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both
with `stream: true` as server-sent events), and `GET /health`. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with matching status codes, so
standard clients report them properly.

Handlers never run the model: they submit the request to the engine's single worker and
await its text pieces on the event loop, so no thread waits while someone else's stream
is read. A full wait queue answers 429 with `Retry-After`; a client that disconnects
cancels its request; SIGTERM or Ctrl-C stops taking requests, fails the ones still
waiting, gives the running one a short grace and exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from finesmith.errors import FinesmithError
from finesmith.serve.engine import DEFAULT_QUEUE_SIZE, ChatEngine, EngineBusy, EngineClosed, Generation, Sampling
from finesmith.serve.registry import ModelRegistry

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SHUTDOWN_TIMEOUT_S = 5  # after this, uvicorn cancels the handlers still running at shutdown


class APIError(Exception):
    """An error returned to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


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


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body, turning the first problem into a 400 that names the field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def build_app(models: ChatEngine | ModelRegistry, api_key: str | None = None, jobs: Any = None,
              runs: list[str] | None = None) -> FastAPI:
    """The FastAPI application serving `models`.

    Args:
        models: one loaded model, or the registry of every served model.
        api_key: when set, every `/v1` request needs `Authorization: Bearer <api_key>`.
        jobs: a `finesmith.serve.jobs.JobService`: adds the files and fine-tuning jobs API and the dashboard.
        runs: folders whose runs (and compare reports) the dashboard shows besides the jobs'.

    Returns:
        A FastAPI app for uvicorn.
    """
    app = FastAPI(title="finesmith", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    registry = models if isinstance(models, ModelRegistry) else ModelRegistry()
    if isinstance(models, ChatEngine):
        registry.add_engine(models)

    async def engine_for(name: str) -> ChatEngine:
        if name not in registry:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"{', '.join(repr(n) for n in registry.names())}", param="model",
                           code="model_not_found")
        try:
            return await asyncio.to_thread(registry.engine, name)
        except FinesmithError as exc:
            raise APIError(500, f"the model '{name}' could not be loaded: {exc}", kind="server_error") from None

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; ends the request quietly

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        loaded = registry.loaded()
        status = loaded[0].status() if len(loaded) == 1 else {"models": {e.name: e.status() for e in loaded}}
        return {"status": "ok", **status}

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

    if jobs is not None:
        from pathlib import Path

        from finesmith.serve.dashboard import add_dashboard
        from finesmith.serve.jobs import add_routes

        add_routes(app, jobs)
        add_dashboard(app, jobs.store, [Path(r) for r in runs or []])
    return app


class RequireKey:
    """ASGI middleware: every `/v1` request needs `Authorization: Bearer <api_key>`."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = APIError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None


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


def serve(specs: str | list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log: Any = print, queue_size: int = DEFAULT_QUEUE_SIZE, precision: str = "auto",
          jobs: bool = True, runs: list[str] | None = None) -> None:
    """Serve models, and the fine-tuning jobs API, until SIGTERM or Ctrl-C (`finesmith serve`).

    Args:
        specs: run folders, exported model folders, `.gguf` files or built-in aliases; the
            first is loaded at start, the others on their first request.
        host: interface to bind; loopback by default. Any other needs `api_key`.
        port: TCP port.
        api_key: required bearer token, if any.
        log: where to print the start-up lines.
        queue_size: requests allowed to wait for each model; beyond that clients get 429.
        precision: model dtype (`auto`: bf16 on CUDA, fp32 on CPU).
        jobs: serve the files and fine-tuning jobs API and the dashboard (state in `$FINESMITH_HOME`).
        runs: folders of local runs for the dashboard (default: `./runs` when it exists).
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    if host not in LOOPBACK and not api_key:
        raise FinesmithError(f"serving on {host} (not loopback) needs --api-key KEY: anyone who can reach the port "
                             "could use the models and start jobs; or serve on 127.0.0.1")
    from finesmith.core.device import inference_dtype

    inference_dtype(precision, "cuda" if torch.cuda.is_available() else "cpu")  # a bad value fails before loading
    registry = ModelRegistry(queue_size, precision)
    names = [registry.add(spec) for spec in specs]
    registry.engine(names[0])  # a model that cannot load fails now, not on the first request
    service = None
    if jobs:
        from finesmith.serve.jobs import JobService
        from finesmith.serve.store import Store

        service = JobService(Store(), registry, log=log)
        service.start()
    log(f"serving {', '.join(repr(n) for n in registry.names())} at http://{host}:{port}/v1 (OpenAI-compatible, "
        f"up to {queue_size} waiting per model)" + ("; requests need the API key" if api_key else ""))
    if service:
        log(f"fine-tuning jobs API on; state in {service.store.root}; dashboard at http://{host}:{port}/")
    if runs is None:
        runs = ["runs"] if os.path.isdir("runs") else []
    config = uvicorn.Config(build_app(registry, api_key, service, runs), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S)
    try:
        DrainingServer(config, registry).run()
    finally:
        if service:
            service.stop()
        registry.close()
        registry.join(timeout=SHUTDOWN_TIMEOUT_S)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, closing the engine as shutdown begins so that waiting handlers end at once.

    uvicorn then waits for open connections; with the queue failed and the running request
    stopped after a short grace, they finish within a few seconds.
    """

    def __init__(self, config: uvicorn.Config, registry: ModelRegistry) -> None:
        super().__init__(config)
        self.registry = registry

    async def shutdown(self, sockets: Any = None) -> None:
        self.registry.close()
        await super().shutdown(sockets)
