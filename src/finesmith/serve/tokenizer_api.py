"""The served models' tokenizers over HTTP, in the shapes vLLM's server gives them.

`GET /tokenizer_info`, `POST /tokenize` and `POST /detokenize`: evaluation harnesses that
send token ids (lm-evaluation-harness's `local-completions` detects these endpoints and
then needs no tokenizer of its own, so it runs offline against the model as served) ask
the server to tokenize with the model's own tokenizer. Each takes an optional `model`
(default: the first model the server was started with).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from finesmith.errors import FinesmithError
from finesmith.serve.engine import ChatEngine
from finesmith.serve.http import APIError, json_body, parse
from finesmith.serve.registry import ModelRegistry

MAX_TOKENIZE_CHARS = 4_000_000  # one request's text; a longer one is refused before tokenizing


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = Field(None, max_length=MAX_TOKENIZE_CHARS)
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


def add_tokenizer_routes(app: FastAPI, registry: ModelRegistry) -> None:
    """`/tokenizer_info`, `/tokenize` and `/detokenize` on `app`."""

    async def engine_for(name: str | None) -> ChatEngine:
        names = registry.names()
        name = name or (names[0] if names else None)
        if name is None or name not in registry:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"{', '.join(repr(n) for n in names)}", param="model", code="model_not_found")
        try:
            return await asyncio.to_thread(registry.engine, name)
        except FinesmithError as exc:
            raise APIError(500, f"the model '{name}' could not be loaded: {exc}", kind="server_error") from None

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict[str, Any]:
        engine = await engine_for(model)
        tok = engine.tokenizer
        return {"model": engine.name, "tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token,
                "bos_token": tok.bos_token, "pad_token": tok.pad_token, "unk_token": tok.unk_token,
                "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
                "model_max_length": engine.context_length, "vocab_size": len(tok)}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = parse(TokenizeRequest, await json_body(request))
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of `prompt` (text) or `messages` (a conversation)", param="prompt")
        engine = await engine_for(req.model)

        def run() -> list[int]:
            if req.messages is not None:
                return engine.chat_ids(req.messages)
            ids = engine.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
            return engine.text_ids(req.prompt) if req.add_special_tokens else list(ids)

        try:
            tokens = await asyncio.to_thread(run)
        except FinesmithError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_prompt") from None
        out: dict[str, Any] = {"count": len(tokens), "max_model_len": engine.context_length, "tokens": tokens}
        if req.return_token_strs:
            out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(tokens)
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse(DetokenizeRequest, await json_body(request))
        engine = await engine_for(req.model)
        size = len(engine.tokenizer)
        bad = next((t for t in req.tokens if not 0 <= t < size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{size - 1})", param="tokens")
        return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, req.tokens)}
