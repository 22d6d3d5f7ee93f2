"""The engine worker: one thread that runs the synchronous, CPU-bound engine for every request.

Continuous batching: between two engine steps the worker takes the requests that arrived, admits those that
fit (rows live at once, KV tokens reserved) in arrival order, and runs one step over every live row; a row
leaves when it ends, and a request that arrives while others decode joins at the next step boundary.
Tokens go from the worker thread to the event loop through `loop.call_soon_threadsafe` into one
asyncio.Queue per request; text is decoded incrementally and only its stable prefix is sent (no half
UTF-8 characters, nothing that could turn into a stop string).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from stand.backends.protocol import Backend as Target
from stand.core.sequence import Row, mean_accepted
from stand.engine import Engine
from stand.server.config import ServerConfig
from stand.server.memory import MemoryBudget, Need, footprint
from stand.server.metrics import Metrics
from stand.server.protocol import queue_full
from stand.server.text import TextStream

log = logging.getLogger("stand.server")
ENGINE_FAILED = "the engine failed on this request (the server's log has the details)"


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
                 loop: asyncio.AbstractEventLoop, metrics: Metrics, need: Need | None = None):
        self.rows, self.prompt_tokens, self.stream = rows, prompt_tokens, stream
        self.loop, self.metrics = loop, metrics
        self.need = need or Need(len(rows), 0, 0, 0, 0)  # what it may take while it runs (reserved meanwhile)
        self.submitted = time.monotonic()
        self.events: asyncio.Queue = asyncio.Queue()
        self.streams = [TextStream(target.decode, r.params.stop) for r in rows]
        self.finished = [False] * len(rows)
        self.ended = False

    @property
    def cancelled(self) -> bool:
        return all(r.cancelled for r in self.rows)

    def cancel(self) -> None:
        """From the event loop: the client went away; its rows end at their next step."""
        if not self.ended:
            self.cancel_rows()

    def cancel_rows(self) -> None:
        for r in self.rows:
            r.cancelled = True

    @property
    def released(self) -> bool:
        """Every row has left the engine: its rows and memory are free."""
        return all(self.finished)

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
        if row.finish_reason == "error":  # decoding it failed: the request fails, its other rows end
            self.fail(ENGINE_FAILED)
            self.cancel_rows()
        elif not row.cancelled:
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

    def drop(self) -> None:
        """Cancelled before it was admitted: it ends without running."""
        for i, r in enumerate(self.rows):
            r.finish_reason = r.finish_reason or "cancelled"
            self.finish_row(i, r)

    def fail(self, message: str) -> None:
        if not self.ended:
            self.ended = True
            self.emit(Failed(message))


# ---- the worker thread ---------------------------------------------------------------------------------


class Worker:
    """Runs the engine on one thread: admits arrived requests between steps, one step at a time."""

    def __init__(self, make_engine: Callable[[], Engine], config: ServerConfig, metrics: Metrics,
                 budget: MemoryBudget | None = None, on_idle: Callable[[], None] | None = None,
                 on_stop: Callable[[], None] | None = None):
        """make_engine: a fresh engine (at start, and after an engine failure); budget: what the live requests may
        take together (None: no bound but max_live_rows). on_idle, on_stop: run on this thread
        when it waits with nothing to do, and after its last step (saving a shared table there never races a
        step)."""
        self.make_engine, self.config, self.metrics = make_engine, config, metrics
        self.on_idle, self.on_stop = on_idle or (lambda: None), on_stop or (lambda: None)
        self.budget = budget
        self.engine = make_engine()
        self.jobs: queue.Queue = queue.Queue()  # arrived, not taken yet
        self.pending: deque[Job] = deque()  # taken, waiting for room
        self.live: list[Job] = []  # admitted, not ended
        self.owner: dict[int, tuple[Job, int]] = {}  # row uid -> (its job, its choice index)
        self.rows = 0  # rows of the live jobs
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="stand-engine", daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting: arrived or taken, not admitted yet."""
        return self.jobs.qsize() + len(self.pending)

    @property
    def tokens(self) -> int:
        """KV tokens the live requests reserve."""
        return sum(j.need.kv_tokens for j in self.live)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.depth >= self.config.max_queue:
                raise queue_full(self.config.max_queue)
            self.jobs.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Waiting requests fail, live ones are cancelled; returns once the worker is done (or after timeout: it
        then ends, and runs on_stop, on its own)."""
        self.jobs.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("the engine is still stepping after %.0f s; it stops (and saves) when its step ends", timeout)

    # the methods below run on the worker thread

    def _loop(self) -> None:
        while self._take():
            self._admit()
            if self.engine.busy:
                self._step()
        for job in self.pending:
            job.fail("the server is shutting down")
        for job in self.live:
            job.cancel()
        while self.engine.busy:
            self._step()
        self.on_stop()

    def _take(self) -> bool:
        """Moves the requests that arrived to `pending`; waits for one when there is nothing else to do.
        False: the server stops."""
        block = not self.engine.busy and not self.pending
        if block and self.jobs.empty():
            self.on_idle()
        while True:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            self.pending.append(job)
            block = False

    def _fits(self, job: Job) -> bool:
        if not self.live:
            return True  # alone it always runs (the app refuses requests larger than the limits)
        if self.rows + len(job.rows) > self.config.max_live_rows:
            return False
        return self.budget is None or self.budget.fits([j.need for j in self.live] + [job.need])

    def _admit(self) -> None:
        """Admits waiting requests in arrival order while they fit; the prompts joining in one step add up to
        at most max_prompt_tokens (one request at least), so a long prefill delays the live rows once."""
        joined, prompt = [], 0
        while self.pending:
            job = self.pending[0]
            if job.cancelled:
                self.pending.popleft().drop()
                continue
            if (joined and prompt + job.prompt_tokens > self.config.max_prompt_tokens) or not self._fits(job):
                break
            self.pending.popleft()
            joined.append(job)
            prompt += job.prompt_tokens
            self.live.append(job)
            self.rows += len(job.rows)
            for i, r in enumerate(job.rows):
                self.owner[r.uid] = (job, i)
            self.engine.add(job.rows)
        if joined:
            self._note_memory()
            now = time.monotonic()
            self.metrics.admitted(len(joined), sum(len(j.rows) for j in joined), sum(now - j.submitted for j in joined))

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            ended = self.engine.step(self._on_commit)
        except Exception:  # beyond the engine's own isolation of failing rows: every live request fails
            log.exception("engine step failed")
            self._fail_live()
            return
        rows = len(self.engine.live) + len(ended)
        if rows:
            self.metrics.step_done(rows, time.perf_counter() - t0)
        for r in ended:
            job, i = self.owner[r.uid]
            job.finish_row(i, r)
        self._release()

    def _on_commit(self, row: Row, new: list[int]) -> None:
        if row.uid in self.owner:
            job, i = self.owner[row.uid]
            job.commit(i, row)

    def _release(self) -> None:
        """Jobs whose rows all ended give back their rows and memory."""
        done = [j for j in self.live if j.released]
        for job in done:
            self.live.remove(job)
            self.rows -= len(job.rows)
            for r in job.rows:
                self.owner.pop(r.uid, None)
        if done:
            self._note_memory()

    def _note_memory(self) -> None:
        """What the live requests reserve, for /metrics."""
        if self.budget is not None:
            needs = [j.need for j in self.live]
            self.metrics.memory_reserved = footprint(needs, self.budget.shape, self.budget.shared_table).total if needs else 0

    def _fail_live(self) -> None:
        """After an engine failure: every live request fails, the drafter forgets all their rows (those that ended
        in the failed step too: their groups are released), a new engine."""
        for job in self.live:
            for r in job.rows:
                r.finish_reason = r.finish_reason or "error"
                with contextlib.suppress(Exception):
                    self.engine.drafter.finish(r)
            job.fail(ENGINE_FAILED)
        self.live, self.owner, self.rows = [], {}, 0
        self._note_memory()
        self.engine = self.make_engine()
