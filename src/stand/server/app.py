"""OpenAI-compatible HTTP server: /v1/completions and /v1/chat/completions with n, streaming and usage.

The engine is synchronous and CPU-bound, so it runs in one worker thread fed by a queue. Requests
that arrive within a short window are batched into one `Engine.run`; the n samples of a prompt are
one drafter group (they share a table), and `share_table` (or `table`) shares one table across
requests, saved to `table` on shutdown. Tokens go from the worker thread to the event loop through
`loop.call_soon_threadsafe` into one asyncio.Queue per request; text is decoded incrementally and
only its stable prefix is sent (no half UTF-8 characters, nothing that could turn into a stop string).

Shortcut: a batch runs to its end before the next one starts (the engine has no way to add rows to
a running batch), so a request that arrives mid-batch waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from stand.api import build_rows, make_engine
from stand.drafters.registry import DRAFTERS, make_drafter
from stand.core.sequence import Row
from stand.engine import Engine
from stand.errors import StandError
from stand.backends.load import load_model
from stand.backends.protocol import Backend as Target
from stand.params import SamplingParams, SpecConfig

log = logging.getLogger("stand.server")
MAX_STOP = 4  # as OpenAI
REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence
_groups = itertools.count()


# ---- configuration ------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    model: str | None = None  # HF directory or .gguf; None = the embedded default
    method: str = "stand"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    table: str | None = None  # n-gram table file: loaded at start, saved on shutdown (implies share_table)
    share_table: bool = False  # one drafter table for every request
    max_queue: int = 64  # requests waiting for the worker; more get 429
    batch_window_ms: float = 50.0  # how long the worker waits for more requests to batch with the first
    max_batch_rows: int = 64  # rows (samples) per engine batch; a single larger request still runs alone
    max_n: int = 16
    served_name: str | None = None  # the model id reported by /v1/models

    def validate(self) -> "ServerConfig":
        if self.method not in DRAFTERS:
            raise StandError(f"unknown method {self.method!r}; choose from {', '.join(sorted(DRAFTERS))}")
        if not 0 <= self.port <= 65535:
            raise StandError(f"port must be in 0..65535, got {self.port}")
        if self.model is not None and not os.path.exists(self.model):
            raise StandError(f"model path does not exist: {self.model}")
        if self.max_queue < 0:
            raise StandError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.batch_window_ms < 0:
            raise StandError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        for name in ("max_batch_rows", "max_n"):
            if getattr(self, name) < 1:
                raise StandError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.table and os.path.isdir(self.table):
            raise StandError(f"--table must be a file path, {self.table} is a directory")
        return self

    @property
    def model_id(self) -> str:
        if self.served_name:
            return self.served_name
        return os.path.basename(self.model.rstrip("/")) if self.model else "SmolLM2-135M-Instruct"

    def spec(self) -> SpecConfig:
        return SpecConfig(method=self.method, share_across_prompts=self.share_table or bool(self.table),
                          table_path=self.table).validate()


# ---- errors in OpenAI's shape ---------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_param(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


# ---- request bodies ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, metadata, ...) are ignored

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension (as vLLM)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (as vLLM): fixed-length outputs for load tests
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(CommonRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(CommonRequest):
    messages: list[ChatMessage]
    logprobs: bool = False


def check_unsupported(req: CommonRequest) -> None:
    """Parameters that would change the output distribution or need what the engine does not keep."""
    if req.presence_penalty or req.frequency_penalty:
        bad = "presence_penalty" if req.presence_penalty else "frequency_penalty"
        raise bad_param(bad, f"{bad} is not supported (it would change the sampling distribution)")
    if req.logit_bias:
        raise bad_param("logit_bias", "logit_bias is not supported")
    if getattr(req, "logprobs", None):
        raise bad_param("logprobs", "logprobs are not supported")
    if getattr(req, "echo", False):
        raise bad_param("echo", "echo is not supported")
    if getattr(req, "suffix", None):
        raise bad_param("suffix", "suffix is not supported")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != req.n:
        raise bad_param("best_of", "best_of is not supported (ask for n samples and choose)")


def sampling_params(req: CommonRequest, max_tokens: int, max_n: int) -> SamplingParams:
    """The request's sampling parameters; 400 for anything out of range."""
    if not 1 <= req.n <= max_n:
        raise bad_param("n", f"n must be in 1..{max_n}, got {req.n}")
    if not 0.0 <= req.temperature <= 2.0:
        raise bad_param("temperature", f"temperature must be in [0, 2], got {req.temperature}")
    if max_tokens < 1:
        raise bad_param("max_tokens", f"max_tokens must be >= 1, got {max_tokens}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise bad_param("stop", f"at most {MAX_STOP} stop sequences, got {len(stop)}")
    params = SamplingParams(req.temperature, req.top_p, req.top_k, max_tokens, req.seed, stop, req.ignore_eos)
    try:
        return params.validate()
    except StandError as e:
        raise bad_param(str(e).split(" ")[0], str(e)) from None


def requested_max_tokens(req: CommonRequest, default: int | None, room: int) -> int:
    """max_completion_tokens, else max_tokens, else the default (None: up to the context)."""
    for value in (req.max_completion_tokens, req.max_tokens, default):
        if value is not None:
            return value
    return max(room, 1)


# ---- prompts -------------------------------------------------------------------------------------------


def check_context(ids: list[int], target: Target, index: int = 0) -> list[int]:
    if not ids:
        raise bad_param("prompt", f"prompt {index} is empty")
    if len(ids) >= target.max_len:
        raise ApiError(413, f"prompt {index} is {len(ids)} tokens; this model's context is {target.max_len} tokens",
                       param="prompt", code="context_length_exceeded")
    if max(ids) >= target.vocab_size or min(ids) < 0:
        raise bad_param("prompt", f"prompt {index} holds token ids outside the vocabulary of {target.vocab_size}")
    return ids


def completion_prompts(prompt, target: Target) -> list[list[int]]:
    """A string, strings, token ids, or lists of token ids -> token ids per prompt (raw, no chat template)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_param("prompt", "prompt is empty")
    ids = [target.encode(p, chat=False) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    return [check_context(p, target, i) for i, p in enumerate(ids)]


def message_text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise bad_param("messages", f"content parts of type {part.get('type')!r} are not supported")
        parts.append(part.get("text", ""))
    return "".join(parts)


def chat_prompt(messages: list[ChatMessage], target: Target) -> list[int]:
    """Messages through the tokenizer's chat template (for one user message: what Target.encode gives)."""
    if not messages:
        raise bad_param("messages", "messages is empty")
    msgs = [{"role": m.role, "content": message_text(m.content)} for m in messages]
    return check_context(target.encode_messages(msgs), target)


# ---- incremental text ------------------------------------------------------------------------------


def stop_index(text: str, stop: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


class TextStream:
    """Decodes a row's tokens as they come and hands out only text that can no longer change."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode, self.stop = decode, stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may be starting here
        self.sent = ""

    def final(self, ids: list[int]) -> str:
        """The finished row's text, cut at the first stop string (the engine's Row.text)."""
        text = self.decode(ids)
        cut = stop_index(text, self.stop) if self.stop else None
        return text if cut is None else text[:cut]

    def stable(self, ids: list[int]) -> str:
        text = self.decode(ids)
        cut = stop_index(text, self.stop) if self.stop else None
        if cut is not None:
            return text[:cut]
        text = text.rstrip(REPLACEMENT)  # an incomplete multi-byte character
        return text[: len(text) - self.hold] if self.hold else text

    def update(self, ids: list[int], done: bool) -> str:
        """The new text since the last call ("" while nothing new is stable)."""
        text = self.final(ids) if done else self.stable(ids)
        if not text.startswith(self.sent):  # the decoder rewrote earlier text: wait for it to settle
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


# ---- jobs: one request's rows and the way back to its handler ----------------------------------------------


@dataclass
class Delta:
    index: int
    text: str


@dataclass
class Done:
    index: int
    text: str
    finish_reason: str
    tokens: int


@dataclass
class End:
    usage: dict
    stats: dict


@dataclass
class Failed:
    message: str


class Job:
    """One request: its rows (choice i = rows[i]), the event queue its handler reads, its streams."""

    def __init__(self, rows: list[Row], prompt_tokens: int, target: Target, stream: bool,
                 loop: asyncio.AbstractEventLoop, metrics: "Metrics"):
        self.rows, self.prompt_tokens, self.stream = rows, prompt_tokens, stream
        self.loop, self.metrics = loop, metrics
        self.events: asyncio.Queue = asyncio.Queue()
        self.streams = [TextStream(target.decode, r.params.stop) for r in rows]
        self.finished = [False] * len(rows)
        self.ended = False

    @property
    def cancelled(self) -> bool:
        return all(r.cancelled for r in self.rows)

    def cancel(self) -> None:
        """From the event loop: the client went away; its rows end at their next step."""
        if self.ended:
            return
        for r in self.rows:
            r.cancelled = True

    # the methods below run on the worker thread

    def emit(self, event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def commit(self, i: int, row: Row) -> None:
        if self.stream and not row.cancelled:
            delta = self.streams[i].update(row.generated, row.done)
            if delta:
                self.emit(Delta(i, delta))
        if row.done:
            self.finish_row(i, row)

    def finish_row(self, i: int, row: Row) -> None:
        if self.finished[i]:
            return
        self.finished[i] = True
        self.metrics.row_done(row)
        if not row.cancelled:
            self.emit(Done(i, self.streams[i].final(row.generated), row.finish_reason or "stop", len(row.generated)))
        if all(self.finished):
            self.end()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        completion = sum(len(r.generated) for r in self.rows)
        steps = sum(r.stats.steps for r in self.rows)
        stats = {"mean_accepted": completion / max(steps, 1), "steps": steps,
                 "draft_seconds": sum(r.stats.draft_seconds for r in self.rows)}
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": self.prompt_tokens + completion}
        self.metrics.job_done(self.prompt_tokens, completion)
        self.emit(End(usage, stats))

    def fail(self, message: str) -> None:
        if not self.ended:
            self.ended = True
            self.emit(Failed(message))


# ---- metrics -----------------------------------------------------------------------------------------


class Metrics:
    """Counters for /metrics, in Prometheus text format."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.completion_tokens = 0
        self.rows = self.cancelled_rows = self.steps = self.generated = 0
        self.draft_seconds = self.engine_seconds = 0.0
        self.batches = self.batch_rows = 0

    def request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def row_done(self, row: Row) -> None:
        with self.lock:
            self.rows += 1
            self.cancelled_rows += row.finish_reason == "cancelled"
            self.steps += row.stats.steps
            self.generated += len(row.generated)
            self.draft_seconds += row.stats.draft_seconds

    def job_done(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def batch_done(self, rows: int, seconds: float) -> None:
        with self.lock:
            self.batches += 1
            self.batch_rows += rows
            self.engine_seconds += seconds

    def render(self, queue_depth: int, ready: bool) -> str:
        with self.lock:
            lines = ["# HELP stand_requests_total HTTP requests by path and status code.",
                     "# TYPE stand_requests_total counter"]
            lines += [f'stand_requests_total{{path="{p}",code="{c}"}} {v}' for (p, c), v in sorted(self.requests.items())]
            rows = [
                ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens),
                ("completion_tokens_total", "counter", "Tokens generated for finished requests.", self.completion_tokens),
                ("rows_total", "counter", "Samples (rows) decoded, cancelled ones included.", self.rows),
                ("cancelled_rows_total", "counter", "Rows ended because their client went away.", self.cancelled_rows),
                ("verify_steps_total", "counter", "Verification passes over all rows.", self.steps),
                ("mean_accepted_tokens", "gauge", "Tokens committed per verification pass (1 = plain decoding).",
                 self.generated / self.steps if self.steps else 0.0),
                ("drafting_seconds_total", "counter", "Time spent in the drafter (propose + observe).", self.draft_seconds),
                ("engine_seconds_total", "counter", "Time the worker spent in Engine.run.", self.engine_seconds),
                ("batches_total", "counter", "Engine batches run.", self.batches),
                ("batch_rows_total", "counter", "Rows over all engine batches.", self.batch_rows),
                ("queue_depth", "gauge", "Requests waiting for the worker.", queue_depth),
                ("model_loaded", "gauge", "1 once the model is loaded.", int(ready)),
            ]
        for name, kind, help_, value in rows:
            lines += [f"# HELP stand_{name} {help_}", f"# TYPE stand_{name} {kind}", f"stand_{name} {value}"]
        return "\n".join(lines) + "\n"


# ---- the worker thread ---------------------------------------------------------------------------------


class Worker:
    """Runs the engine on one thread: takes a request, waits a short window for more, runs them as one batch."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.carry: Job | None = None  # a job that did not fit the last batch
        self.running: list[Job] = []
        self.thread = threading.Thread(target=self._loop, name="stand-engine", daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + (self.carry is not None)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.depth >= self.config.max_queue:
                raise ApiError(429, f"the server queue is full ({self.config.max_queue} requests waiting); retry later",
                               type_="rate_limit_error", code="queue_full")
            self.jobs.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        for job in list(self.running):
            job.cancel()
        self.jobs.put(None)
        self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._run(batch)

    def _gather(self) -> list[Job] | None:
        """The next batch: the first waiting job, then whatever arrives within the window, up to max_batch_rows."""
        first, self.carry = self.carry or self.jobs.get(), None
        if first is None:
            return None
        batch, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.config.batch_window_ms / 1000
        while rows < self.config.max_batch_rows:
            try:
                job = self.jobs.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            if rows + len(job.rows) > self.config.max_batch_rows:
                self.carry = job
                break
            batch.append(job)
            rows += len(job.rows)
        return [j for j in batch if not j.cancelled]

    def _run(self, batch: list[Job]) -> None:
        owner = {r.uid: (job, i) for job in batch for i, r in enumerate(job.rows)}
        rows = [r for job in batch for r in job.rows]
        self.running = batch
        t0 = time.perf_counter()
        try:
            if rows:
                self.engine.run(rows, lambda row, new: self._on_commit(owner, row))
        except Exception as e:  # a bug or an engine failure: the batch's requests get a 500, the server lives on
            log.exception("engine batch failed")
            self._forget(rows)
            for job in batch:
                job.fail(f"the engine failed: {type(e).__name__}: {e}")
        finally:
            self.running = []
            self.metrics.batch_done(len(rows), time.perf_counter() - t0)
            for job in batch:
                for i, r in enumerate(job.rows):
                    if r.done:
                        job.finish_row(i, r)
                job.end()

    def _on_commit(self, owner: dict, row: Row) -> None:
        job, i = owner[row.uid]
        job.commit(i, row)

    def _forget(self, rows: list[Row]) -> None:
        """After a failed batch: let the drafter drop the state of rows it never saw finish."""
        for r in rows:
            if not r.done:
                r.finish_reason = "error"
                with contextlib.suppress(Exception):
                    self.engine.drafter.finish(r)


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


# ---- response shapes -------------------------------------------------------------------------------------


@dataclass
class Shape:
    """How a completion or a chat completion is written, whole or as stream chunks."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, choices: list[Done], usage: dict, stats: dict) -> dict:
        if self.chat:
            out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
        else:
            out = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                   for c in choices]
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": out,
                "usage": usage, "stand": stats}

    def chunk(self, index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [], "usage": usage}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


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
    state = State(config, loader or (lambda: load_model(config.model, config.dtype)))

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


KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


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
        return await respond(req, request, prompts, Shape(False, config.model_id), default_max=16)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        target = state.require_ready()
        check_unsupported(req)
        prompts = [chat_prompt(req.messages, target)]
        return await respond(req, request, prompts, Shape(True, config.model_id), default_max=None)

    async def respond(req: CommonRequest, request: Request, prompts: list[list[int]], shape: Shape, default_max):
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
