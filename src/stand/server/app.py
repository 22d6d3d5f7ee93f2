"""OpenAI-compatible HTTP server: /v1/completions and /v1/chat/completions with n, streaming and usage,
/v1/models, /health and /metrics.

The model loads in the background; one worker thread (server/worker.py) runs the engine with continuous
batching, and prompts are tokenised on a thread of their own, off the event loop. The n samples of a prompt
are one drafter group (they share a table), and `share_table` (or `table`) shares one table across requests,
saved to `table` on shutdown. What a request may ask for is bounded by ServerConfig's limits (400 naming the
field beyond one); server/memory.py says what the largest request may cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from stand.api import build_rows, make_engine
from stand.api import load_target
from stand.backends.protocol import Backend as Target
from stand.drafters.registry import make_drafter
from stand.engine import Engine
from stand.errors import StandError
from stand.params import SamplingParams
from stand.server.config import ServerConfig, startup_warnings
from stand.server.gate import Gate, install_error_handlers
from stand.server.memory import ModelShape, describe, kv_tokens, shape_of
from stand.server.metrics import Metrics
from stand.server.protocol import (ApiError, ChatRequest, CommonRequest, CompletionRequest, Shape, bad_param,
                                   chat_prompt, check_rows, check_unsupported, completion_prompts,
                                   requested_max_tokens, sampling_params, split_prompts, sse)
from stand.server.worker import Delta, Done, End, Failed, Job, Worker

__all__ = ["ServerConfig", "create_app", "serve"]

log = logging.getLogger("stand.server")
_groups = itertools.count()


# ---- the application state -----------------------------------------------------------------------------


class State:
    """The model (loaded in the background), the engine worker, the tokenising thread, and the metrics."""

    def __init__(self, config: ServerConfig, loader: Callable[[], Target]):
        self.config, self.loader = config, loader
        self.metrics = Metrics()
        self.target: Target | None = None
        self.worker: Worker | None = None
        self.shape: ModelShape | None = None
        self.drafter = None
        self.load_error: str | None = None
        self.loading = threading.Thread(target=self._load, name="stand-load", daemon=True)
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="stand-tokenize")

    def start(self) -> None:
        self.loading.start()

    def _load(self) -> None:
        try:
            target = self.loader()
            spec = self.config.spec()
            self.drafter = make_drafter(spec, target.vocab_size, target)
            if self.config.table and not hasattr(self.drafter, "save_table"):
                log.warning("method %s keeps no table; --table %s is ignored", self.config.method, self.config.table)
            self.shape = shape_of(target, self.drafter, self.config)
            self.worker = Worker(engines(target, spec, self.drafter), self.config, self.metrics, self.shape)
            self.target = target
            log.info("model %s ready (method %s)", target.name, self.config.method)
            log.info(describe(self.config, self.shape))
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

    async def off_loop(self, fn, *args):
        """fn(*args) on the tokenising thread (the event loop keeps serving meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    def submit(self, prompts: list[list[int]], n: int, params: SamplingParams, stream: bool) -> Job:
        """Queues a request; choice prompt_index * n + j is sample j of that prompt."""
        kv = kv_tokens([len(p) for p in prompts], n, params.max_new_tokens, self.shape)
        if self.shape.capacity is not None and kv > self.shape.capacity:
            raise bad_param("max_tokens", f"this request may hold {kv:,} tokens in the KV cache (its prompts and "
                                          f"n x max_tokens); the server holds {self.shape.capacity:,} for all "
                                          "requests: ask for fewer tokens or samples")
        groups = build_rows(prompts, n, params)  # each row's rng is seeded from (seed, prompt, sample) as in generate
        for group in groups:
            gid = next(_groups)  # unique across live requests: each prompt's n samples are one drafter group
            for r in group:
                r.group = gid
        rows = [r for group in groups for r in group]
        job = Job(rows, sum(len(p) for p in prompts), self.target, stream, asyncio.get_running_loop(), self.metrics,
                  kv)
        self.worker.submit(job)
        return job

    def shutdown(self) -> None:
        self.tokenizing.shutdown(wait=False, cancel_futures=True)
        if self.worker is not None:
            self.worker.stop()
        if self.config.table and hasattr(self.drafter, "save_table"):
            try:
                self.drafter.save_table(self.config.table)
                log.info("saved the n-gram table to %s", self.config.table)
            except Exception:
                log.exception("could not save the n-gram table to %s", self.config.table)


def engines(target: Target, spec, drafter) -> Callable[[], Engine]:
    """The worker's engines: the first from make_engine (which may measure this machine's cost grid), later
    ones (after an engine failure) with the same grid."""
    first = make_engine(target, spec, drafter)
    made = iter([first])
    return lambda: next(made, None) or Engine(target, drafter, first.step_tokens, first.grid)


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
    state = State(config, loader or (lambda: load_target(config.model, config.backend, config.dtype, config.device,
                                                         config.method)))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for warning in startup_warnings(config):
            log.warning(warning)
        state.start()
        yield
        await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="stand", lifespan=lifespan)
    app.state.stand = state
    app.add_middleware(Gate, config=config, metrics=state.metrics)
    install_error_handlers(app)
    install_routes(app, state)
    return app


def install_routes(app: FastAPI, state: State) -> None:
    config = state.config

    @app.get("/health")
    async def health():
        state.require_ready()
        return {"status": "ok", "model": config.model_id, "method": config.method}

    @app.get("/metrics")
    async def metrics():
        worker = state.worker
        depth, live = (worker.depth, worker.rows) if worker else (0, 0)
        return PlainTextResponse(state.metrics.render(depth, live, state.ready), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "stand", "method": config.method}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        target = state.require_ready()
        check_unsupported(req)
        params = sampling_params(req, requested_max_tokens(req, config), config)
        raw = split_prompts(req.prompt)
        check_rows(len(raw), req.n, config)
        prompts = await state.off_loop(completion_prompts, raw, target, config.max_prompt_tokens)
        return await respond(state, req, request, prompts, params, Shape(False, config.model_id))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        target = state.require_ready()
        check_unsupported(req)
        params = sampling_params(req, requested_max_tokens(req, config), config)
        prompts = [await state.off_loop(chat_prompt, req.messages, target, config.max_prompt_tokens)]
        return await respond(state, req, request, prompts, params, Shape(True, config.model_id))


async def respond(state: State, req: CommonRequest, request: Request, prompts: list[list[int]],
                  params: SamplingParams, shape: Shape):
    """Queues the request's rows and answers as a stream of events or, once every choice is done, whole."""
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
