"""What every request passes before a route: the API key, the body-size limit, requests counted by status; and
the error handlers that put every error in OpenAI's shape."""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from stand.errors import StandError
from stand.server.config import ServerConfig, is_loopback
from stand.server.metrics import Metrics
from stand.server.protocol import ApiError, bad_param, internal_error

log = logging.getLogger("stand.server")
KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
BODY_METHODS = {"POST", "PUT", "PATCH"}


class Gate:
    """Pure ASGI middleware (streams pass straight through): the API key check, the body-size limit (413), and
    requests counted by path and status."""

    open_paths = {"/health"}

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [None]  # the response's status, once it has started

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = None
            if not self._host_ok(scope):
                error = ApiError(403, "the Host header names another server: a keyless loopback server answers only "
                                      "requests addressed to localhost (give --api-key to serve other names)",
                                 code="bad_host")
            elif not self._allowed(scope, path):
                error = ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                 code="invalid_api_key")
            elif scope.get("method") in BODY_METHODS:
                receive, error = await self._read_body(scope, receive)
            if error is not None:
                await error.response()(scope, receive, send_and_note)
            else:
                await self._answer(scope, receive, send_and_note, status)
        finally:
            self.metrics.request(path if path in KNOWN_PATHS else "other", status[0] or 500)

    async def _answer(self, scope, receive, send, status: list[int | None]) -> None:
        """Runs the route; a bug in it answers a JSON 500 here, below Starlette's outermost handler, so the
        exception never reaches uvicorn (which would close the client's keep-alive connection after answering).
        status: what `send` notes of the response (None until it starts)."""
        try:
            await self.app(scope, receive, send)
        except Exception as e:
            if status[0] is not None:
                raise  # half a response went out: only closing the connection tells the client
            log.error("%s %s failed", scope.get("method"), scope["path"], exc_info=e)
            await internal_error().response()(scope, receive, send)

    def _allowed(self, scope, path: str) -> bool:
        key = self.config.api_key
        if not key or path in self.open_paths:
            return True
        headers = dict(scope.get("headers") or [])
        return _key_ok(headers.get(b"authorization", b""), key)

    def _host_ok(self, scope) -> bool:
        """Without a key on loopback, only requests for a loopback name: a web page whose name an attacker
        re-points at 127.0.0.1 (DNS rebinding) sends its own name as Host."""
        if self.config.api_key or not is_loopback(self.config.host):
            return True
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        return is_loopback(_without_port(host))

    async def _read_body(self, scope, receive):
        """Reads the body whole, up to max_body_bytes (a declared or an actual size beyond: 413); returns a
        receive that replays it (and then hears the client's disconnect), and the error if any."""
        limit = self.config.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return receive, too_large(int(declared), limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay(message, receive), None  # the client left: let the app hear it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return receive, too_large(size, limit)
            if not message.get("more_body", False):
                break
        return _replay({"type": "http.request", "body": b"".join(chunks), "more_body": False}, receive), None


def _replay(first: dict, receive):
    """A receive that gives `first`, then whatever the real one gives."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return replay


def too_large(size: int, limit: int) -> ApiError:
    """size: the declared size, or what was read when it passed the limit."""
    return ApiError(413, f"the request body is larger than this server takes: {size:,} bytes or more, the limit "
                         f"is {limit:,} (max_body_bytes)", code="request_too_large")


def _key_ok(header: bytes, key: str) -> bool:
    """The header's bytes against the key's UTF-8 (what a client sends for a non-ASCII key)."""
    scheme, _, given = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key.encode("utf-8"))


def _without_port(host: str) -> str:
    """'name:port' -> 'name'; '[::1]:port' -> '::1'."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape."""
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        return bad_param(param, f"invalid request: {'.'.join(loc) or 'body'}: {first.get('msg', 'bad value')}").response()

    @app.exception_handler(StandError)
    async def stand_error(request: Request, e: StandError):
        return ApiError(400, str(e)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):  # a bug: logged here, never shown to the client
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return internal_error().response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), kind).response()
