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
import dataclasses
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from stand.api import build_rows, load_target, make_engine
from stand.backends.protocol import Backend as Target
from stand.drafters.registry import make_drafter
from stand.engine import Engine
from stand.errors import StandError
from stand.params import SamplingParams
from stand.server.config import ServerConfig, startup_warnings
from stand.server.gate import Gate, install_error_handlers
from stand.server.memory import (BUDGET_SHARE, MemoryBudget, ModelShape, budget_line, describe, free_bytes, mib, need_of,
                                 rss_bytes, shape_of, worst_case)
from stand.server.metrics import Metrics
from stand.server.protocol import (ApiError, ChatRequest, CommonRequest, CompletionRequest, Shape, bad_param,
                                   chat_messages, chat_prompt, check_rows, check_untokenized, check_unsupported,
                                   completion_prompts, longest_token_bytes, queue_full, requested_max_tokens,
                                   sampling_params, split_prompts, sse)
from stand.server.worker import Delta, Done, End, Failed, Job, Worker

__all__ = ["ServerConfig", "create_app", "serve"]

log = logging.getLogger("stand.server")
_groups = itertools.count()
TABLE_SAVE_EVERY = 600.0  # seconds: the --table file is saved at most this often while the server is idle


# ---- the application state -----------------------------------------------------------------------------


class State:
    """The model (loaded in the background), the engine worker, the tokenising thread, and the metrics."""

    def __init__(self, config: ServerConfig, loader: Callable[[], Target], on_load_error: Callable[[], None] = None):
        self.config, self.loader, self.on_load_error = config, loader, on_load_error
        self.metrics = Metrics()
        self.target: Target | None = None
        self.worker: Worker | None = None
        self.shape: ModelShape | None = None
        self.budget: MemoryBudget | None = None
        self.drafter = None
        self.load_error: str | None = None
        self.token_bytes = 1  # the most bytes a token decodes to (+1), known once loaded
        self.waiting = 0  # requests waiting for the tokenising thread (they count toward max_queue)
        self.loading = threading.Thread(target=self._load, name="stand-load", daemon=True)
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="stand-tokenize")

    def start(self) -> None:
        self.loading.start()

    def _load(self) -> None:
        try:
            target = self.loader()
            bound = target.max_sequences  # llama.cpp chosen by --backend auto: its sequences bound the live rows
            if bound and self.config.max_live_rows > bound:
                log.warning("max_live_rows %d lowered to %d: %s holds no more sequences", self.config.max_live_rows,
                            bound, target.kind)
                self.config.max_live_rows = bound
            spec = self.config.spec()
            self.drafter = make_drafter(spec, target.vocab_size, target)
            if self.config.table and not hasattr(self.drafter, "save_table"):
                log.warning("method %s keeps no table; --table %s is ignored", self.config.method, self.config.table)
            self.token_bytes = longest_token_bytes(target)
            self.shape = shape_of(target, self.drafter, self.config)
            self.budget = self._budget()
            on_idle, on_stop = table_keeper(self.config, self.drafter)
            self.worker = Worker(engines(target, spec, self.drafter), self.config, self.metrics, self.budget,
                                 on_idle, on_stop)
            self.target = target
            log.info("model %s ready (method %s)", target.name, self.config.method)
            log.info(describe(self.config, self.shape))
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, StandError) else str(e)
            log.error("could not load the model: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error()

    def _budget(self) -> MemoryBudget:
        """What requests may take together: --memory-budget, or BUDGET_SHARE of the memory free now (the model
        loaded); logged with the largest request's footprint, and a warning if that is over it."""
        given, free, rss = self.config.memory_budget_mib, free_bytes(), rss_bytes()
        limit = given * 2**20 if given else int(BUDGET_SHARE * (free if free is not None else 4 << 30))
        budget = MemoryBudget(self.shape, limit, self.config.shared_table)
        self.metrics.memory_ceiling = rss + limit
        log.info(budget_line(budget, free, bool(given), rss))
        worst = worst_case(self.config.max_n, self.config.max_prompt_tokens, self.config.max_tokens_limit, self.shape,
                           self.config.shared_table)
        if worst.total > limit:
            log.warning("a request at the limits may take %s, over the budget: such requests get 400 (lower --max-n, "
                        "--max-prompt-tokens or --max-tokens-limit, or raise --memory-budget)", mib(worst.total))
        return budget

    @property
    def ready(self) -> bool:
        return self.target is not None

    def require_ready(self) -> Target:
        if self.target is None:
            if self.load_error:  # its text (paths, the machine) is for the server's log only
                raise ApiError(503, "the model failed to load (the server's log says why)", "server_error",
                               code="model_load_failed")
            raise ApiError(503, "the model is loading; retry shortly", "server_error", code="model_loading")
        return self.target

    async def tokenize(self, fn, *args):
        """fn(*args) on the tokenising thread (the event loop keeps serving meanwhile). Requests waiting for it
        count toward max_queue with those waiting for the engine: 429 beyond."""
        if self.waiting + self.worker.depth >= self.config.max_queue:
            raise queue_full(self.config.max_queue)
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)
        finally:
            self.waiting -= 1

    def submit(self, prompts: list[list[int]], n: int, params: SamplingParams, stream: bool) -> Job:
        """Queues a request; choice prompt_index * n + j is sample j of that prompt."""
        need = need_of([len(p) for p in prompts], n, params.max_new_tokens, self.shape)
        why = self.budget.over([need])
        if why is not None:
            raise bad_param("max_tokens", f"this request may take {why}: ask for fewer tokens or samples")
        groups = build_rows(prompts, n, params)  # each row's rng is seeded from (seed, prompt, sample) as in generate
        for group in groups:
            gid = next(_groups)  # unique across live requests: each prompt's n samples are one drafter group
            for r in group:
                r.group = gid
        rows = [r for group in groups for r in group]
        job = Job(rows, sum(len(p) for p in prompts), self.target, stream, asyncio.get_running_loop(), self.metrics,
                  need)
        self.worker.submit(job)
        return job

    def shutdown(self) -> None:
        self.tokenizing.shutdown(wait=False, cancel_futures=True)
        if self.worker is not None:
            self.worker.stop()  # it saves the table (if any) after its last step


def table_keeper(config: ServerConfig, drafter) -> tuple[Callable[[], None], Callable[[], None]]:
    """(on_idle, on_stop) for the worker: the --table file saved on the engine's thread, when the server stops and
    while it is idle at most every TABLE_SAVE_EVERY seconds (a save serialises, hashes and syncs the whole table:
    done whenever the last row ended, it stalled the next request). The drafter's own save is turned off."""
    if not (config.table and hasattr(drafter, "save_table")):
        return (lambda: None), (lambda: None)
    drafter.config = dataclasses.replace(drafter.config, table_path=None)  # loaded already; saved here, not there
    last = [time.monotonic()]

    def save() -> None:
        last[0] = time.monotonic()
        try:
            drafter.save_table(config.table)
            log.info("saved the n-gram table to %s", config.table)
        except Exception:
            log.exception("could not save the n-gram table to %s", config.table)

    def idle() -> None:
        if time.monotonic() - last[0] >= TABLE_SAVE_EVERY:
            save()

    return idle, save


def held_groups(drafter) -> int:
    """Drafter groups still held (per-request tables, suffix caches, consensus groups; a shared one not counted).
    len and `in` only: the worker may change these dicts meanwhile."""
    parts = [drafter] + [getattr(drafter, n) for n in ("stand", "consensus") if hasattr(drafter, n)]
    held = [getattr(p, a, None) for p in parts for a in ("tables", "caches", "groups")]
    return sum(len(d) - ("shared" in d) for d in held if isinstance(d, dict))


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


def create_app(config: ServerConfig, loader: Callable[[], Target] | None = None,
               on_load_error: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app; the model loads in the background at startup (loader: how; default load_target;
    on_load_error: called if it fails, e.g. to stop serving)."""
    config.validate()
    state = State(config, loader or (lambda: load_target(config.model, config.backend, config.dtype, config.device,
                                                         config.method)), on_load_error)

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
        state.metrics.drafter_groups = held_groups(state.drafter)
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
        check_untokenized(raw, state.token_bytes, config.max_prompt_tokens, "prompt")
        prompts = await state.tokenize(completion_prompts, raw, target, config.max_prompt_tokens)
        return await respond(state, req, request, prompts, params, Shape(False, config.model_id))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        target = state.require_ready()
        check_unsupported(req)
        params = sampling_params(req, requested_max_tokens(req, config), config)
        msgs = chat_messages(req.messages)
        check_untokenized(["".join(m["content"] for m in msgs)], state.token_bytes, config.max_prompt_tokens,
                          "messages")
        prompts = [await state.tokenize(chat_prompt, msgs, target, config.max_prompt_tokens)]
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
    # with a shared table, how well a request drafted tells of other users' text: no stats then
    return shape.whole(choices, end.usage, None if state.config.shared_table else end.stats)


def serve(config: ServerConfig, log_level: str = "info") -> None:
    """Runs the server until interrupted (the table, if any, is saved on shutdown); StandError if the model
    cannot be loaded (the server stops rather than answer 503 for ever)."""
    import uvicorn

    server: list[uvicorn.Server] = []
    app = create_app(config, on_load_error=lambda: setattr(server[0], "should_exit", True))
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server.append(uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level)))
    server[0].run()
    error = app.state.stand.load_error
    if error:
        raise StandError(f"could not load the model: {error}")
