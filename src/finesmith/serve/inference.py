"""The OpenAI inference endpoints: `GET /v1/models` (and `/v1/models/{id}`),
`POST /v1/chat/completions` and `POST /v1/completions` (both with `stream: true` as
server-sent events).

Handlers never run the model: they render and tokenise the prompt in a thread (a huge
prompt does not hold up the event loop), submit the request to the engine's single worker
and await its text pieces on the event loop, so no thread waits while someone else's stream
is read. A full wait queue answers 429 with `Retry-After`; a client that disconnects
cancels its request.

Beyond plain text: `tools` / `tool_choice` and conversations with tool calls and results
(`finesmith.serve.tools`); `response_format` `json_object` / `json_schema` through
constrained decoding (`finesmith.serve.constrain`); token log-probabilities (`logprobs`,
`top_logprobs`; on completions the legacy `logprobs: N` with `echo`, and `max_tokens: 0`
for the prompt's log-probabilities alone, as lm-evaluation-harness asks for them); prompts
as token ids and several prompts per completions request (`finesmith.serve.logprobs`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from finesmith.errors import FinesmithError
from finesmith.serve.engine import ChatEngine, EngineBusy, EngineClosed, Generation, Sampling
from finesmith.serve.http import APIError, ClientGone, json_body, parse
from finesmith.serve.logprobs import TokenText, chat_logprobs, legacy_logprobs
from finesmith.serve.registry import ModelRegistry
from finesmith.serve.tools import ToolPlan, ToolStream, call_grammar, split_calls, template_messages, tool_plan

INT64 = 2**63  # OpenAI's seed is an int64
MAX_TOP_LOGPROBS = 20


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def plain(self) -> dict[str, Any]:
        content = self.content
        text = content if isinstance(content, str) or content is None else "".join(p.text for p in content)
        if text is None and not (self.role == "assistant" and self.tool_calls):
            raise APIError(400, f"a {self.role} message needs content", param="messages")
        # Chat templates know "system"; "developer" is OpenAI's newer name for the same turn.
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text or ""}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.role == "tool":
            out.update({k: v for k, v in (("tool_call_id", self.tool_call_id), ("name", self.name)) if v})
        return out


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: Function


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
    seed: int | None = Field(None, ge=-INT64, le=INT64 - 1)
    stream_options: dict[str, Any] | None = None

    def sampling(self, **extra: Any) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        return Sampling(self.max_tokens, self.temperature, self.top_p, tuple(stops), self.seed, **extra)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(Options):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(Options):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for this endpoint; 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


@dataclass
class ChatPlan:
    """A chat request made ready in a thread: its prompt ids, sampling and tool plan."""

    prompt: list[int]
    sampling: Sampling
    tools: ToolPlan | None


def prepare_chat(engine: ChatEngine, req: ChatRequest) -> ChatPlan:
    """Render and tokenise the conversation, compile any output constraint (blocking: run in a thread)."""
    try:
        plan = tool_plan(engine, [t.model_dump() for t in req.tools] if req.tools else None, req.tool_choice)
    except FinesmithError as exc:
        raise APIError(400, str(exc), param="tool_choice") from None
    try:
        messages = template_messages([m.plain() for m in req.messages])
    except FinesmithError as exc:
        raise APIError(400, str(exc), param="messages") from None
    grammar = None
    try:
        grammar = call_grammar(engine, plan) if plan else None
        if grammar is None:
            grammar = response_grammar(engine, req.response_format)
    except FinesmithError as exc:
        raise APIError(400, str(exc), param="response_format" if plan is None else "tools") from None
    prompt = render(lambda: engine.chat_ids(messages, plan.tools if plan else None), "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    sampling = req.sampling(logprobs=logprobs, grammar=grammar)
    budget(engine, prompt, sampling, "messages")
    return ChatPlan(prompt, sampling, plan)


def response_grammar(engine: ChatEngine, response_format: dict[str, Any] | None) -> str | None:
    """The grammar of `response_format` (None for plain text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    from finesmith.serve.constrain import json_grammar

    if kind == "json_object":
        grammar = json_grammar(None)
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise FinesmithError("response_format json_schema needs {\"json_schema\": {\"name\": ..., "
                                 "\"schema\": {...}}}")
        grammar = json_grammar(schema)
    else:
        raise FinesmithError(f"response_format type '{kind}' is not supported; use text, json_object or json_schema")
    engine.grammar_tokenizer().check(grammar)
    return grammar


def render(make: Callable[[], list[int]], param: str) -> list[int]:
    try:
        return make()
    except FinesmithError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_prompt") from None


def budget(engine: ChatEngine, prompt: list[int], sampling: Sampling, param: str) -> None:
    try:
        engine.token_budget(prompt, sampling.max_tokens)
    except FinesmithError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_prompt") from None


def prepare_completion(engine: ChatEngine, req: CompletionRequest) -> tuple[list[list[int]], Sampling]:
    """Each prompt's ids (token-id prompts as given) and the sampling (blocking: run in a thread)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens 0 generates nothing; it needs echo: true (the prompt's log-probabilities)",
                       param="max_tokens")
    size = max(len(engine.tokenizer), int(getattr(engine.model.config, "vocab_size", 0) or 0))
    ids = []
    for p in prompts:
        if isinstance(p, str):
            ids.append(render(lambda p=p: engine.text_ids(p), "prompt"))
        else:
            if not p or any(t < 0 or t >= size for t in p):
                raise APIError(400, f"a token-id prompt must be non-empty ids from 0 to {size - 1}", param="prompt")
            ids.append(list(p))
    sampling = req.sampling(logprobs=req.logprobs, echo=req.echo)
    for p in ids:
        budget(engine, p, sampling, "prompt")
    return ids, sampling


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

    def model_object(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": registry.owners.get(name, "finesmith")}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(name) for name in registry.names()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id not in registry:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_object(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = parse(ChatRequest, await json_body(request))
        engine = await engine_for(req.model)
        if req.max_completion_tokens:
            req.max_tokens = req.max_completion_tokens
        plan = await asyncio.to_thread(prepare_chat, engine, req)
        generation = queue(engine.generate(plan.prompt, plan.sampling))
        reply = Reply("chat.completion", engine, [generation], req.top_logprobs or 0)
        if req.stream:
            return StreamingResponse(reply.chat_events(generation, plan.tools, req.include_usage()),
                                     media_type="text/event-stream")
        texts = await finish([generation], request)
        return await asyncio.to_thread(reply.chat, texts[0], generation, plan.tools)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = parse(CompletionRequest, await json_body(request))
        engine = await engine_for(req.model)
        prompts, sampling = await asyncio.to_thread(prepare_completion, engine, req)
        if req.stream and len(prompts) != 1:
            raise APIError(400, "stream one prompt per request (several prompts need stream: false)", param="prompt")
        generations = []
        try:
            for ids in prompts:
                generations.append(queue(engine.generate(ids, sampling)))
        except APIError:
            for g in generations:
                g.cancel()
            raise
        reply = Reply("text_completion", engine, generations, req.logprobs or 0)
        if req.stream:
            return StreamingResponse(reply.text_events(generations[0], req.echo, req.include_usage()),
                                     media_type="text/event-stream")
        texts = await finish(generations, request)
        return await asyncio.to_thread(reply.text, texts, generations, req.echo)


def queue(generation: Generation) -> Generation:
    """Submit to the worker; a full queue is a 429 with `Retry-After`, a closing engine a 503."""
    try:
        return generation.submit()
    except EngineBusy as exc:
        raise APIError(429, str(exc), kind="requests", code="rate_limit_exceeded",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    except EngineClosed as exc:
        raise shutting_down(exc) from None


def shutting_down(exc: Exception) -> APIError:
    return APIError(503, str(exc), kind="server_error", code="server_shutting_down", headers={"Retry-After": "5"})


async def finish(generations: list[Generation], request: Request) -> list[str]:
    """The whole answers, awaited on the event loop; a client that disconnects cancels its requests."""
    answers = [asyncio.ensure_future(g.text_async()) for g in generations]
    together = asyncio.ensure_future(asyncio.gather(*answers, return_exceptions=True))
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({together, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not together.done():
            together.cancel()
            for answer, g in zip(answers, generations):
                answer.cancel()
                g.cancel()
    if not together.done() or together.cancelled():
        raise ClientGone()
    texts = []
    for result in together.result():
        if isinstance(result, EngineClosed):
            raise shutting_down(result)
        if isinstance(result, asyncio.CancelledError):
            raise ClientGone()
        if isinstance(result, BaseException):
            raise APIError(500, f"generation failed: {result}", kind="server_error")
        texts.append(result)
    return texts


async def disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Reply:
    """Builds OpenAI response bodies and stream chunks for one request."""

    def __init__(self, kind: str, engine: ChatEngine, generations: list[Generation], top: int) -> None:
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        self.id, self.kind, self.model = f"{prefix}-{uuid.uuid4().hex}", kind, engine.name
        self.created, self.top = int(time.time()), top
        self.prompt_tokens = sum(len(g.prompt) for g in generations)
        self.tokenizer, self.token_text = engine.tokenizer, TokenText(engine.tokenizer)
        self.stop_ids = set(engine.stop_ids)

    def usage(self, generations: list[Generation]) -> dict[str, int]:
        completion = sum(g.completion_tokens for g in generations)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def envelope(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def shown_records(self, records: list[Any]) -> list[Any]:
        """The generated tokens' entries, without the end-of-turn token (which is not text)."""
        return [r for r in records if r.token not in self.stop_ids]

    def chat(self, text: str, generation: Generation, tools: ToolPlan | None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish_reason = generation.finish_reason
        if tools is not None:
            content, calls = split_calls(text, tools)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish_reason = "tool_calls"
        logprobs = None
        if generation.sampling.logprobs is not None:
            logprobs = {"content": chat_logprobs(self.shown_records(generation.records), self.token_text, self.top)}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}
        return self.envelope("chat.completion", [choice], usage=self.usage([generation]))

    def text(self, texts: list[str], generations: list[Generation], echo: bool) -> dict[str, Any]:
        choices = []
        for index, (text, g) in enumerate(zip(texts, generations)):
            prompt_text = self.tokenizer.decode(g.prompt, skip_special_tokens=False) if echo else ""
            choices.append({"index": index, "text": prompt_text + text, "finish_reason": g.finish_reason,
                            "logprobs": self.legacy(g, echo, 0)})
        return self.envelope("text_completion", choices, usage=self.usage(generations))

    def legacy(self, g: Generation, echo: bool, offset: int, records: list[Any] | None = None) -> dict[str, Any] | None:
        if g.sampling.logprobs is None:
            return None
        if records is None:
            # the legacy shape lists every generated token, the end-of-text one too (as `<|endoftext|>`
            # was): lm-eval's loglikelihood reads the prompt's entries as all but the last one
            records = (list(g.prompt_records) if echo else []) + list(g.records)
            if not echo:
                offset = len(self.tokenizer.decode(g.prompt, skip_special_tokens=False))
        return legacy_logprobs(records, self.token_text, offset)

    async def chat_events(self, generation: Generation, tools: ToolPlan | None, usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return self.envelope("chat.completion.chunk", [choice])

        sent = 0  # generated tokens whose log-probabilities have gone out

        def new_logprobs(upto: int | None = None) -> Any:
            nonlocal sent
            if generation.sampling.logprobs is None:
                return None
            records = list(generation.records[sent:upto])
            sent += len(records)
            return {"content": chat_logprobs(self.shown_records(records), self.token_text, self.top)}

        stream = ToolStream(tools) if tools is not None else None
        yield sse(chunk({"role": "assistant", "content": ""}, None))
        try:
            async for piece in generation.pieces():
                shown = stream.feed(piece) if stream else piece
                if shown:
                    yield sse(chunk({"content": shown}, None, new_logprobs(len(generation.records))))
        except Exception as exc:  # headers are already sent: report in-band, as OpenAI does
            yield sse(stream_error(exc))
            return
        finish_reason, calls = generation.finish_reason, []
        if stream:
            tail, calls = stream.finish()
            if tail:
                yield sse(chunk({"content": tail}, None, new_logprobs()))
        for index, call in enumerate(calls):
            yield sse(chunk({"tool_calls": [{"index": index, **call}]}, None))
        rest = new_logprobs()
        if calls:
            finish_reason = "tool_calls"
        yield sse(chunk({}, finish_reason, rest if rest and rest["content"] else None))
        if usage:
            yield sse(self.envelope("chat.completion.chunk", [], usage=self.usage([generation])))
        yield "data: [DONE]\n\n"

    async def text_events(self, generation: Generation, echo: bool, usage: bool) -> AsyncIterator[str]:
        def chunk(piece: str, finish: str | None, logprobs: Any = None) -> dict[str, Any]:
            return self.envelope("text_completion", [{"index": 0, "text": piece, "finish_reason": finish,
                                                      "logprobs": logprobs}])

        sent, offset = 0, 0

        def new_logprobs(upto: int | None = None) -> Any:
            nonlocal sent, offset
            if generation.sampling.logprobs is None:
                return None
            records = list(generation.records[sent:upto])
            sent += len(records)
            out = self.legacy(generation, False, offset, records)
            offset += sum(len(t) for t in out["tokens"])
            return out

        try:
            started = False
            async for piece in generation.pieces():
                if not started:  # the worker has run the prompt: its log-probabilities are ready
                    started = True
                    if echo:
                        yield sse(self.echo_chunk(generation, chunk))
                    offset = len(self.tokenizer.decode(generation.prompt, skip_special_tokens=False))
                yield sse(chunk(piece, None, new_logprobs(len(generation.records))))
            if not started and echo:
                yield sse(self.echo_chunk(generation, chunk))
        except Exception as exc:
            yield sse(stream_error(exc))
            return
        rest = new_logprobs()
        yield sse(chunk("", generation.finish_reason, rest if rest and rest["tokens"] else None))
        if usage:
            yield sse(self.envelope("text_completion", [], usage=self.usage([generation])))
        yield "data: [DONE]\n\n"

    def echo_chunk(self, generation: Generation, chunk: Any) -> dict[str, Any]:
        prompt_text = self.tokenizer.decode(generation.prompt, skip_special_tokens=False)
        logprobs = self.legacy(generation, True, 0, list(generation.prompt_records))
        return chunk(prompt_text, None, logprobs)


def stream_error(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, EngineClosed):
        return shutting_down(exc).body()
    return APIError(500, f"generation failed: {exc}", kind="server_error").body()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
