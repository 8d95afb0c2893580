"""The HTTP pieces every route module shares: OpenAI-shaped errors, body parsing, the API key
and the guard that keeps other web sites out.

`server`, `inference`, `jobs` and `dashboard` import from here and never from each other's
routes, so the serve package has no import circle.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

MAX_JSON_BYTES = 4 * 1024 * 1024  # a JSON request body; a long chat is well under 1 MB
MAX_JSON_DEPTH = 64  # arrays and objects inside each other
INLINE_JSON_BYTES = 64 * 1024  # smaller bodies are parsed on the event loop, bigger ones in a thread
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
STATE_CHANGING = (b"POST", b"PUT", b"PATCH", b"DELETE")
UPLOAD_PATH = "/v1/files"  # the one route that takes multipart/form-data


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


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body, turning the first problem into a 400 that names the field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def size_text(n: int) -> str:
    """`n` bytes in words: 4 MB, 512 KB, 300 bytes."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def too_large(what: str, limit: int, param: str | None = None) -> APIError:
    return APIError(413, f"{what} is larger than this server's limit of {size_text(limit)} ({limit} bytes)",
                    param=param, code="request_too_large")


async def json_body(request: Request) -> Any:
    """The request's JSON body, read up to the app's byte cap (413 beyond) and parsed off the event loop.

    Only standard JSON is taken (no NaN or Infinity) and at most `MAX_JSON_DEPTH` levels of
    nesting; anything else is a 400.
    """
    limit = getattr(request.app.state, "max_json_bytes", MAX_JSON_BYTES)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large("the request body", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large("the request body", limit)
        chunks.append(chunk)
    data = b"".join(chunks)
    if size <= INLINE_JSON_BYTES:  # parsed in well under a millisecond: not worth a thread hop
        return parse_json(data)
    return await asyncio.to_thread(parse_json, data)


def parse_json(data: bytes) -> Any:
    """Strict JSON (no NaN/Infinity) with at most `MAX_JSON_DEPTH` levels, or a 400."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    try:
        body = json.loads(data, parse_constant=refuse)
    except RecursionError:
        raise APIError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise APIError(400, "the request body is not valid JSON") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
    return body


def json_depth(value: Any) -> int:
    """How deep arrays and objects nest in `value` (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            stack.extend((child, depth + 1) for child in item)
    return deepest


_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s:'\"()<>/]+/)*([^\s:'\"()<>/]+)")


def strip_paths(text: str, *roots: Any) -> str:
    """`text` without this machine's paths, for answers to clients: a path under one of `roots`
    becomes relative to it, any other absolute path its last part."""
    for root in roots:
        text = text.replace(str(root).rstrip("/") + "/", "")
    return _PATH.sub(r"\1", text)


KEYED_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # what the API key guards


class RequireKey:
    """ASGI middleware: every `/v1` request (and the tokenizer endpoints) needs
    `Authorization: Bearer <api_key>`."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")  # lifespan scopes have none
        if scope["type"] == "http" and (path == "/v1" or path.startswith(KEYED_PATHS)):
            if not secrets.compare_digest(bearer_token(dict(scope["headers"]).get(b"authorization", b"")),
                                          self.expected):
                error = APIError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def bearer_token(header: bytes) -> bytes:
    """The token of an `Authorization` header; the scheme name is case-insensitive (RFC 9110)."""
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


# ---- the guard against other web sites ----------------------------------------------------------

def allowed_host_list(host: str, port: int, extra: list[str] | None = None,
                      api_key: str | None = None) -> list[str] | None:
    """The `Host` header values a server bound to `host:port` answers (None: any).

    The bound address and the loopback names with the bound port, plus `extra` (`--allowed-host`:
    `name` for any port, `name:port` for one). Bound to every interface (0.0.0.0, ::) with an API
    key and no `extra`, any Host is answered: clients name the machine in ways the server cannot
    know, and the key (which a rebinding page does not have) guards every `/v1` request.
    """
    extra = [h.strip().lower() for h in extra or [] if h.strip()]
    if host in WILDCARD_HOSTS and api_key and not extra:
        return None
    bound = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = [n for n in dict.fromkeys([bound.lower(), *LOOPBACK_HOSTS]) if n.strip("[]") not in WILDCARD_HOSTS]
    return [f"{n}:{port}" for n in names] + extra


def split_host(value: str) -> tuple[str, str | None]:
    """`name[:port]` → (name, port or None); IPv6 names keep their brackets."""
    if value.startswith("["):
        name, _, rest = value.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    name, colon, port = value.rpartition(":")
    return (name, port) if colon else (value, None)


class RequestGuard:
    """ASGI middleware refusing what a web page on another site can make a browser send.

    - `Host` must be one of `allowed_hosts` (DNS rebinding: a page whose name now points at
      127.0.0.1 sends its own name as Host);
    - an `Origin`, when sent, must be the server's own (browsers send it on every cross-site
      request that could change something, form posts included);
    - a request that changes state with a body must be `application/json`, except the file
      upload, which is `multipart/form-data` and, without an `Origin`, needs an
      `Authorization` header (which no form can send). A page can send text/plain, form
      encodings and multipart without asking the server first; JSON it cannot.

    Clients that are not browsers (the openai library, curl) send no Origin and are unaffected.
    """

    def __init__(self, app: Any, allowed_hosts: list[str] | None) -> None:
        self.app = app
        self.any_host = allowed_hosts is None
        self.exact = {h for h in allowed_hosts or [] if split_host(h)[1] is not None}
        self.any_port = {h for h in allowed_hosts or [] if split_host(h)[1] is None}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem is not None:
                await problem.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def host_allowed(self, host: str) -> bool:
        return self.any_host or host in self.exact or split_host(host)[0] in self.any_port

    def problem(self, scope: dict[str, Any]) -> APIError | None:
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, value)
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if not self.host_allowed(host):
            return APIError(403, f"this server does not answer for the host '{host[:100]}'; add it with "
                                 "`finesmith serve --allowed-host NAME` if you mean to reach it by that name",
                            code="host_not_allowed")
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1").strip().lower()
            scheme, _, netloc = text.partition("://")
            same = netloc == host or (not self.any_host and netloc in self.exact)
            if scheme not in ("http", "https") or not same:
                return APIError(403, f"requests from the web page at '{text[:100]}' are refused: only this "
                                     "server's own dashboard may call it from a browser", code="origin_not_allowed")
        method = scope["method"].encode()
        if method not in STATE_CHANGING:
            return None
        fetch_site = headers.get(b"sec-fetch-site", b"same-origin")
        if fetch_site not in (b"same-origin", b"none"):
            return APIError(403, "requests from other web sites are refused", code="origin_not_allowed")
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["path"] == UPLOAD_PATH and method == b"POST":
            if media != b"multipart/form-data":
                return APIError(415, "upload the file as multipart/form-data with fields `file` and `purpose`",
                                code="unsupported_media_type")
            if origin is None and b"authorization" not in headers:
                return APIError(403, "a file upload without an Origin header needs an Authorization header "
                                     "(any value when the server has no API key): a form on another web site "
                                     "cannot send one", param="file", code="origin_not_allowed")
            return None
        has_body = headers.get(b"content-length", b"0").strip() not in (b"0", b"") or b"transfer-encoding" in headers
        if media and media != b"application/json" or not media and has_body:
            return APIError(415, f"send the body as application/json, not {media.decode('latin-1') or 'untyped'}",
                            code="unsupported_media_type")
        return None
