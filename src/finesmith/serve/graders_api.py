"""The hosted graders API, served locally: run and validate a grader.

- `POST /v1/fine_tuning/alpha/graders/run` `{grader, model_sample, item?}` → `{reward,
  metadata: {name, type, errors, execution_time, scores, token_usage, sampled_model_name},
  sub_rewards, model_grader_token_usage_per_model}`;
- `POST /v1/fine_tuning/alpha/graders/validate` `{grader}` → `{grader}` (normalized).

An invalid grader is a 400 naming the field (`param`: `grader.…`); a grading that fails is a
200 whose `metadata.errors` has the flag set and whose reward is 0, as the hosted API answers.
Grading runs off the event loop (a python grader's sandboxed process, a judge's answer).

`add_grader_routes(app, chat=None, *, models=None, embed=None, limits=None)`: `chat(model,
messages, sampling) -> text` runs the judge of model graders (None: model graders are refused
at validation); `models`: the names a judge may have (a collection, or a function returning
one, called per request, or the server's ModelRegistry, whose `names()` is asked per request;
None: any); `embed`: the embedding function of `cosine` similarity; `limits`: the python
graders' sandbox limits (the hosted ones by default: 2 minutes, 2 GB).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, StrictStr

from finesmith.graders.grading import grade, uses_models, validate
from finesmith.graders.model_graders import Chat
from finesmith.graders.python_grader import DEFAULT_LIMITS, PythonLimits
from finesmith.graders.result import GraderError
from finesmith.graders.similarity import Embed
from finesmith.serve.http import APIError, json_body, parse

RUN_PATH = "/v1/fine_tuning/alpha/graders/run"
VALIDATE_PATH = "/v1/fine_tuning/alpha/graders/validate"


class RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]
    model_sample: StrictStr
    item: Any = None


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]


def add_grader_routes(app: FastAPI, chat: Chat | None = None, *,
                      models: Any = None,
                      embed: Embed | None = None, limits: PythonLimits | None = None) -> None:
    """Add the run and validate routes to `app` (see the module docstring)."""
    python_limits = limits or DEFAULT_LIMITS

    def checked(grader: dict[str, Any]) -> dict[str, Any]:
        names = models.names() if hasattr(models, "names") else models() if callable(models) else models
        try:
            normalized = validate(grader, models=set(names) if names is not None else None, embed=embed)
        except GraderError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        if chat is None and uses_models(normalized):
            raise APIError(400, "grader: score_model and label_model graders need a judge model, and this server "
                                "has none configured for graders", param="grader.model")
        return normalized

    @app.post(RUN_PATH)
    async def run_grader(request: Request) -> dict[str, Any]:
        body = parse(RunBody, await json_body(request))
        grader = await asyncio.to_thread(checked, body.grader)
        result = await asyncio.to_thread(grade, grader, body.model_sample, body.item, chat=chat, embed=embed,
                                         limits=python_limits, validated=True)
        return result.run_response()

    @app.post(VALIDATE_PATH)
    async def validate_grader(request: Request) -> dict[str, Any]:
        body = parse(ValidateBody, await json_body(request))
        return {"grader": await asyncio.to_thread(checked, body.grader)}
