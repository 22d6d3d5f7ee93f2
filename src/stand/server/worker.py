"""The engine worker: one thread that runs the synchronous, CPU-bound engine for every request.

Requests wait in a queue; those that arrive within a short window are batched into one `Engine.run`.
Tokens go from the worker thread to the event loop through `loop.call_soon_threadsafe` into one
asyncio.Queue per request; text is decoded incrementally and only its stable prefix is sent (no half
UTF-8 characters, nothing that could turn into a stop string).

A batch runs to its end before the next one starts (the engine cannot add rows to a running batch),
so a request that arrives mid-batch waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from stand.backends.protocol import Backend as Target
from stand.core.sequence import Row, mean_accepted, stop_index
from stand.engine import Engine
from stand.server.config import ServerConfig
from stand.server.metrics import Metrics
from stand.server.protocol import ApiError

log = logging.getLogger("stand.server")
REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


# ---- incremental text ------------------------------------------------------------------------------


class TextStream:
    """Decodes a row's tokens as they come and hands out only text that can no longer change."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode, self.stop = decode, stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may be starting here
        self.sent = ""

    def _cut(self, ids: list[int]) -> tuple[str, bool]:
        """The decoded text cut before the first stop string, and whether there was one."""
        text = self.decode(ids)
        cut = stop_index(text, self.stop)
        return (text, False) if cut is None else (text[:cut], True)

    def final(self, ids: list[int]) -> str:
        """The finished row's text, cut at the first stop string (the engine's Row.final_text)."""
        return self._cut(ids)[0]

    def stable(self, ids: list[int]) -> str:
        """The text of an unfinished row that later tokens cannot change."""
        text, stopped = self._cut(ids)
        if stopped:
            return text
        text = text.rstrip(REPLACEMENT)  # an incomplete multi-byte character
        return text[: len(text) - self.hold] if self.hold else text

    def update(self, ids: list[int], done: bool) -> str:
        """The new text since the last call ("" while nothing new is stable)."""
        text = self.final(ids) if done else self.stable(ids)
        if not text.startswith(self.sent):  # the decoder rewrote earlier text: wait for it to settle
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


# ---- events: from the worker thread to a request's handler ---------------------------------------------


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


# ---- jobs: one request's rows and the way back to its handler ----------------------------------------------


class Job:
    """One request: its rows (choice i = rows[i]), the event queue its handler reads, its streams."""

    def __init__(self, rows: list[Row], prompt_tokens: int, target: Target, stream: bool,
                 loop: asyncio.AbstractEventLoop, metrics: Metrics):
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
        stats = {"mean_accepted": mean_accepted(completion, steps), "steps": steps,
                 "draft_seconds": sum(r.stats.draft_seconds for r in self.rows)}
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": self.prompt_tokens + completion}
        self.metrics.job_done(self.prompt_tokens, completion)
        self.emit(End(usage, stats))

    def fail(self, message: str) -> None:
        if not self.ended:
            self.ended = True
            self.emit(Failed(message))


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
