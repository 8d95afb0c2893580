"""`finesmith serve`: an OpenAI-compatible HTTP API over one fine-tuned model.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both
with `stream: true` as server-sent events), and `GET /health`. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with matching status codes, so
standard clients report them properly.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from finesmith.errors import FinesmithError
from finesmith.serve.engine import ChatEngine, Generation, Sampling

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class APIError(Exception):
    """An error returned to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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


def build_app(engine: ChatEngine, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving `engine`.

    Args:
        engine: the loaded model.
        api_key: when set, every `/v1` request needs `Authorization: Bearer <api_key>`.

    Returns:
        A FastAPI app for uvicorn.
    """
    app = FastAPI(title="finesmith", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.middleware("http")
    async def authorise(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = APIError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": created,
                                            "owned_by": "finesmith"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = parse(ChatRequest, await json_body(request))
        check_model(engine, req.model)
        if req.max_completion_tokens:
            req.max_tokens = req.max_completion_tokens
        messages = [m.plain() for m in req.messages]
        generation = start(engine, lambda: engine.chat_ids(messages), req.sampling(), "messages")
        reply = Reply("chat.completion", engine.name, len(generation.prompt))
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(reply.chat_events(generation, usage), media_type="text/event-stream")
        text = await run_in_threadpool(generation.text)
        return reply.chat(text, generation)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = parse(CompletionRequest, await json_body(request))
        check_model(engine, req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request", param="prompt")
        generation = start(engine, lambda: engine.text_ids(prompts[0]), req.sampling(), "prompt")
        reply = Reply("text_completion", engine.name, len(generation.prompt))
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(reply.text_events(generation, usage), media_type="text/event-stream")
        text = await run_in_threadpool(generation.text)
        return reply.text(text, generation)

    return app


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None


def check_model(engine: ChatEngine, name: str) -> None:
    if name != engine.name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{engine.name}'",
                       param="model", code="model_not_found")


def start(engine: ChatEngine, render: Any, sampling: Sampling, param: str) -> Generation:
    """Render and budget the prompt; user-fixable problems become 400s before any streaming."""
    try:
        return engine.generate(render(), sampling)
    except FinesmithError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_prompt") from None


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

    def chat_events(self, generation: Generation, usage: bool) -> Iterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return self.envelope("chat.completion.chunk", [choice])

        yield sse(chunk({"role": "assistant", "content": ""}, None))
        yield from self._stream(generation, lambda piece: chunk({"content": piece}, None),
                                lambda: chunk({}, generation.finish_reason), "chat.completion.chunk", usage)

    def text_events(self, generation: Generation, usage: bool) -> Iterator[str]:
        def chunk(piece: str, finish: str | None) -> dict[str, Any]:
            return self.envelope("text_completion", [{"index": 0, "text": piece, "finish_reason": finish,
                                                      "logprobs": None}])

        yield from self._stream(generation, lambda piece: chunk(piece, None),
                                lambda: chunk("", generation.finish_reason), "text_completion", usage)

    def _stream(self, generation: Generation, piece_chunk: Any, final_chunk: Any, kind: str,
                usage: bool) -> Iterator[str]:
        try:
            for piece in generation:
                yield sse(piece_chunk(piece))
        except Exception as exc:  # headers are already sent: report in-band, as OpenAI does
            yield sse(APIError(500, f"generation failed: {exc}", kind="server_error").body())
            return
        yield sse(final_chunk())
        if usage:
            yield sse(self.envelope(kind, [], usage=self.usage(generation)))
        yield "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def serve(spec: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log: Any = print) -> None:
    """Load a model and serve it until interrupted (`finesmith serve`).

    Args:
        spec: run folder, exported model folder, `.gguf` file or built-in alias.
        host: interface to bind; loopback by default so nothing is exposed unless asked.
        port: TCP port.
        api_key: required bearer token, if any.
        log: where to print the start-up lines.
    """
    import uvicorn

    from finesmith.serve.engine import load_engine

    if host not in LOOPBACK and not api_key:
        log(f"warning: serving on {host} without --api-key; anyone who can reach this port can use the model")
    engine = load_engine(spec)
    log(f"serving '{engine.name}' at http://{host}:{port}/v1 (OpenAI-compatible)"
        + ("; requests need the API key" if api_key else ""))
    uvicorn.run(build_app(engine, api_key), host=host, port=port, log_level="warning")
