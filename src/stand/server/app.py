"""OpenAI-compatible HTTP server: /v1/completions and /v1/chat/completions with n, streaming and usage,
/v1/models, /health and /metrics.

The model loads in the background; one worker thread (server/worker.py) runs the engine. The n samples
of a prompt are one drafter group (they share a table), and `share_table` (or `table`) shares one table
across requests, saved to `table` on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import threading
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stand.api import build_rows, make_engine
from stand.backends.load import load_model
from stand.backends.protocol import Backend as Target
from stand.drafters.registry import make_drafter
from stand.errors import StandError
from stand.params import SamplingParams
from stand.server.config import ServerConfig
from stand.server.metrics import Metrics
from stand.server.protocol import (ApiError, ChatRequest, CommonRequest, CompletionRequest, Shape, bad_param,
                                   chat_prompt, check_unsupported, completion_prompts, requested_max_tokens,
                                   sampling_params, sse)
from stand.server.worker import Delta, Done, End, Failed, Job, Worker

__all__ = ["ServerConfig", "create_app", "serve"]

log = logging.getLogger("stand.server")
KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
_groups = itertools.count()


# ---- the application state -----------------------------------------------------------------------------


class State:
    """The model (loaded in the background), the engine worker, and the metrics."""

    def __init__(self, config: ServerConfig, loader: Callable[[], Target]):
        self.config, self.loader = config, loader
        self.metrics = Metrics()
        self.target: Target | None = None
        self.worker: Worker | None = None
        self.drafter = None
        self.load_error: str | None = None
        self.loading = threading.Thread(target=self._load, name="stand-load", daemon=True)

    def start(self) -> None:
        self.loading.start()

    def _load(self) -> None:
        try:
            target = self.loader()
            spec = self.config.spec()
            self.drafter = make_drafter(spec, target.vocab_size, target)
            if self.config.table and not hasattr(self.drafter, "save_table"):
                log.warning("method %s keeps no table; --table %s is ignored", self.config.method, self.config.table)
            self.worker = Worker(make_engine(target, spec, self.drafter), self.config, self.metrics)
            self.target = target
            log.info("model %s ready (method %s)", target.name, self.config.method)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, StandError) else str(e)
            log.error("could not load the model: %s", self.load_error)

    @property
    def ready(self) -> bool:
        return self.target is not None

    def require_ready(self) -> Target:
        if self.target is None:
            if self.load_error:
                raise ApiError(503, f"the model failed to load: {self.load_error}", "server_error", code="model_load_failed")
            raise ApiError(503, "the model is loading; retry shortly", "server_error", code="model_loading")
        return self.target

    def submit(self, prompts: list[list[int]], n: int, params: SamplingParams, stream: bool) -> Job:
        """Queues a request; choice prompt_index * n + j is sample j of that prompt."""
        groups = build_rows(prompts, n, params)  # each row's rng is seeded from (seed, prompt, sample) as in generate
        for group in groups:
            gid = next(_groups)  # unique across live requests: each prompt's n samples are one drafter group
            for r in group:
                r.group = gid
        rows = [r for group in groups for r in group]
        job = Job(rows, sum(len(p) for p in prompts), self.target, stream, asyncio.get_running_loop(), self.metrics)
        self.worker.submit(job)
        return job

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.config.table and hasattr(self.drafter, "save_table"):
            try:
                self.drafter.save_table(self.config.table)
                log.info("saved the n-gram table to %s", self.config.table)
            except Exception:
                log.exception("could not save the n-gram table to %s", self.config.table)


# ---- a job's events -> the response ---------------------------------------------------------------------


async def stream_events(job: Job, shape: Shape, n: int, include_usage: bool):
    """Server-sent events for every choice, then (optionally) usage, then [DONE]; a disconnect cancels the job."""
    try:
        if shape.chat:
            for i in range(n):
                yield sse(shape.chunk(i, None, role=True))
        while True:
            ev = await job.events.get()
            if isinstance(ev, Delta):
                yield sse(shape.chunk(ev.index, ev.text))
            elif isinstance(ev, Done):
                yield sse(shape.chunk(ev.index, None, ev.finish_reason))
            elif isinstance(ev, Failed):
                yield sse(ApiError(500, ev.message, "server_error").body())
                break
            elif isinstance(ev, End):
                if include_usage:
                    yield sse(shape.usage_chunk(ev.usage))
                break
        yield sse("[DONE]")
    finally:
        job.cancel()


async def collect(job: Job, request: Request, poll: float = 1.0) -> tuple[list[Done], End]:
    """Waits for every choice of a non-streaming request; cancels it if the client goes away meanwhile."""
    done: dict[int, Done] = {}
    try:
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), poll)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ApiError(499, "client disconnected", "server_error") from None
                continue
            if isinstance(ev, Done):
                done[ev.index] = ev
            elif isinstance(ev, Failed):
                raise ApiError(500, ev.message, "server_error")
            elif isinstance(ev, End):
                return [done[i] for i in sorted(done)], ev
    finally:
        job.cancel()


# ---- the application ------------------------------------------------------------------------------------


def create_app(config: ServerConfig, loader: Callable[[], Target] | None = None) -> FastAPI:
    """The FastAPI app; the model loads in the background at startup (loader: how; default load_model)."""
    config.validate()
    state = State(config, loader or (lambda: load_model(config.model, config.dtype, config.backend)))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        yield
        await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="stand", lifespan=lifespan)
    app.state.stand = state
    app.add_middleware(Gate, state=state)
    install_error_handlers(app)
    install_routes(app, state)
    return app


class Gate:
    """Pure ASGI middleware (streams pass straight through): the API key check, and requests counted by status."""

    open_paths = {"/health"}

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self._allowed(scope, path):
                await self.app(scope, receive, send_and_note)
            else:
                error = ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send_and_note)
        finally:
            self.state.metrics.request(path if path in KNOWN_PATHS else "other", status[0])

    def _allowed(self, scope, path: str) -> bool:
        key = self.state.config.api_key
        if not key or path in self.open_paths:
            return True
        headers = dict(scope.get("headers") or [])
        return _key_ok(headers.get(b"authorization", b"").decode("latin-1"), key)


def _key_ok(header: str, key: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), kind).response()


def install_routes(app: FastAPI, state: State) -> None:
    config = state.config

    @app.get("/health")
    async def health():
        state.require_ready()
        return {"status": "ok", "model": config.model_id, "method": config.method}

    @app.get("/metrics")
    async def metrics():
        depth = state.worker.depth if state.worker else 0
        return PlainTextResponse(state.metrics.render(depth, state.ready), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "stand", "method": config.method}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        target = state.require_ready()
        check_unsupported(req)
        prompts = completion_prompts(req.prompt, target)
        return await respond(state, req, request, prompts, Shape(False, config.model_id), default_max=16)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        target = state.require_ready()
        check_unsupported(req)
        prompts = [chat_prompt(req.messages, target)]
        return await respond(state, req, request, prompts, Shape(True, config.model_id), default_max=None)


async def respond(state: State, req: CommonRequest, request: Request, prompts: list[list[int]], shape: Shape,
                  default_max: int | None):
    """Queues the request's rows and answers as a stream of events or, once every choice is done, whole."""
    config = state.config
    room = state.target.max_len - max(len(p) for p in prompts)
    params = sampling_params(req, requested_max_tokens(req, default_max, room), config.max_n)
    if len(prompts) * req.n > config.max_batch_rows:
        raise bad_param("prompt", f"{len(prompts)} prompts x n={req.n} is more than the {config.max_batch_rows} "
                                  "samples a request may ask for")
    job = state.submit(prompts, req.n, params, req.stream)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(stream_events(job, shape, len(job.rows), include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    choices, end = await collect(job, request)
    return shape.whole(choices, end.usage, end.stats)


def serve(config: ServerConfig, log_level: str = "info") -> None:
    """Runs the server until interrupted (the table, if any, is saved on shutdown)."""
    import uvicorn

    app = create_app(config)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level)
