"""`finesmith serve`: an OpenAI-compatible HTTP API over fine-tuned models, the fine-tuning
jobs API and the dashboard, in one process.

`build_app` assembles the routes (`inference`, `jobs`, `dashboard`, sharing the HTTP helpers
of `http`); `serve` loads the models and runs uvicorn. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with matching status codes, so standard
clients report them properly. SIGTERM or Ctrl-C stops taking requests, fails the ones still
waiting, gives the running one a short grace and exits.

Every request passes `finesmith.serve.http.RequestGuard` first (Host, Origin and body type:
what a web page on another site could make a browser send is refused), then the API key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from finesmith.errors import FinesmithError
from finesmith.serve.engine import DEFAULT_QUEUE_SIZE, ChatEngine
from finesmith.serve.graders_api import add_grader_routes
from finesmith.serve.http import (LOOPBACK_HOSTS, MAX_JSON_BYTES, APIError, ClientGone, RequestGuard, RequireKey,
                                  allowed_host_list)
from finesmith.serve.inference import add_inference_routes
from finesmith.serve.registry import ModelRegistry
from finesmith.serve.tokenizer_api import add_tokenizer_routes

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SHUTDOWN_TIMEOUT_S = 5  # after this, uvicorn cancels the handlers still running at shutdown
DEFAULT_MAX_UPLOAD = 512 * 1024 * 1024  # the hosted API's limit for one file


def build_app(models: ChatEngine | ModelRegistry, api_key: str | None = None, jobs: Any = None,
              runs: list[str] | None = None, allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
              max_json_bytes: int = MAX_JSON_BYTES) -> FastAPI:
    """The FastAPI application serving `models`.

    Args:
        models: one loaded model, or the registry of every served model.
        api_key: when set, every `/v1` request needs `Authorization: Bearer <api_key>`.
        jobs: a `finesmith.serve.jobs.JobService`: adds the files and fine-tuning jobs API and the dashboard.
        runs: folders whose runs (and compare reports) the dashboard shows besides the jobs'.
        allowed_hosts: `Host` values answered (`name` any port, `name:port` one; None: any), see
            `finesmith.serve.http.allowed_host_list`; by default the loopback names.
        max_json_bytes: the largest JSON request body; beyond it 413.

    Returns:
        A FastAPI app for uvicorn.
    """
    app = FastAPI(title="finesmith", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.max_json_bytes = max_json_bytes
    registry = models if isinstance(models, ModelRegistry) else ModelRegistry()
    if isinstance(models, ChatEngine):
        registry.add_engine(models)

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

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part not in ("query", "path", "body", "header")]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        return APIError(400, f"{param}: {message}" if param else message, param=param).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, or the machine (disk, memory): this request fails alone, without a traceback or
        # this machine's paths in the answer; uvicorn logs the traceback on the server's side.
        return APIError(500, f"the server failed on this request ({type(exc).__name__}); see the server's log",
                        kind="server_error", code="internal_error").response()

    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts)  # outermost: before the key is looked at

    @app.get("/health")
    async def health() -> dict[str, Any]:
        loaded = registry.loaded()
        status = loaded[0].status() if len(loaded) == 1 else {"models": {e.name: e.status() for e in loaded}}
        return {"status": "ok", **status}

    add_inference_routes(app, registry)
    add_tokenizer_routes(app, registry)
    add_grader_routes(app, judge_chat(registry), models=registry)
    if jobs is not None:
        from finesmith.serve.dashboard import add_dashboard
        from finesmith.serve.jobs import add_routes

        add_routes(app, jobs)
        add_dashboard(app, jobs.store, [Path(r) for r in runs or []])
    return app


def judge_chat(registry: ModelRegistry) -> Any:
    """The `chat(model, messages, sampling) -> text` of model graders: the named served model
    answers (blocking; the graders API calls it in a thread). The reply schema the graders ask
    for is not enforced: the grader parses the reply's text (see `finesmith.graders.model_graders`)."""
    from finesmith.serve.engine import Sampling

    def chat(model: str, messages: list[dict[str, str]], sampling: dict[str, Any]) -> dict[str, Any]:
        engine = registry.engine(model)
        ids = engine.chat_ids(messages)
        text = engine.generate(ids, Sampling(sampling.get("max_tokens") or 512, sampling.get("temperature", 0.0),
                                             sampling.get("top_p", 1.0), (), sampling.get("seed"))).text()
        return {"text": text, "usage": {"prompt_tokens": len(ids)}}

    return chat


def serve(specs: str | list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log: Any = print, queue_size: int = DEFAULT_QUEUE_SIZE, precision: str = "auto",
          jobs: bool = True, runs: list[str] | None = None, allowed_hosts: list[str] | None = None,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD, max_adapters: int = 8) -> None:
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
        allowed_hosts: more `Host` names to answer besides the bound address and loopback
            (`--allowed-host`); see `finesmith.serve.http.allowed_host_list`.
        max_upload_bytes: the largest file `/v1/files` takes (413 beyond).
        max_adapters: LoRA adapters kept loaded on each shared base (`finesmith.serve.adapters`; 0: merge each).
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    if host not in LOOPBACK and not api_key:
        raise FinesmithError(f"serving on {host} (not loopback) needs --api-key KEY: anyone who can reach the port "
                             "could use the models and start jobs; or serve on 127.0.0.1")
    from finesmith.core.device import inference_dtype

    inference_dtype(precision, "cuda" if torch.cuda.is_available() else "cpu")  # a bad value fails before loading
    home_lock = None
    if jobs:  # before loading anything: a second server on this home must not train its jobs again
        from finesmith.serve.store import home, lock_home

        home_lock = lock_home(home())
        os.umask(0o077)  # the home, its database, uploads and runs (and the workers') are this user's only
    registry = ModelRegistry(queue_size, precision, max_adapters)
    names = [registry.add(spec) for spec in specs]
    registry.engine(names[0])  # a model that cannot load fails now, not on the first request
    service = None
    if jobs:
        from finesmith.serve.jobs import JobService
        from finesmith.serve.store import Store

        service = JobService(Store(), registry, log=log, max_upload_bytes=max_upload_bytes)
        service.start()
    log(f"serving {', '.join(repr(n) for n in registry.names())} at http://{host}:{port}/v1 (OpenAI-compatible, "
        f"up to {queue_size} waiting per model)" + ("; requests need the API key" if api_key else ""))
    if service:
        log(f"fine-tuning jobs API on; state in {service.store.root}; dashboard at http://{host}:{port}/")
    if runs is None:
        runs = ["runs"] if os.path.isdir("runs") else []
    app = build_app(registry, api_key, service, runs, allowed_host_list(host, port, allowed_hosts, api_key))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S)
    try:
        DrainingServer(config, registry).run()
    finally:
        if service:
            service.stop()
        registry.close()
        registry.join(timeout=SHUTDOWN_TIMEOUT_S)
        if home_lock is not None:
            home_lock.close()


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
