"""The server's counters, written for /metrics in Prometheus text format."""

from __future__ import annotations

import threading

from stand.core.sequence import Row, mean_accepted


class Metrics:
    """Counters for /metrics, updated from the event loop and the worker thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.completion_tokens = 0
        self.rows = self.cancelled_rows = self.steps = self.generated = 0
        self.draft_seconds = self.engine_seconds = self.queue_seconds = 0.0
        self.engine_steps = self.step_rows = self.admitted_jobs = self.admitted_rows = 0
        self.memory_ceiling = self.memory_reserved = 0  # bytes: the server's own plus the budget; the live requests'
        self.drafter_groups = 0  # groups the drafter holds (set when /metrics is read)

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

    def admitted(self, jobs: int, rows: int, waited: float) -> None:
        """Requests joined the running engine (after waiting `waited` seconds in all)."""
        with self.lock:
            self.admitted_jobs += jobs
            self.admitted_rows += rows
            self.queue_seconds += waited

    def step_done(self, rows: int, seconds: float) -> None:
        with self.lock:
            self.engine_steps += 1
            self.step_rows += rows
            self.engine_seconds += seconds

    def render(self, queue_depth: int, live_rows: int, ready: bool) -> str:
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
                 mean_accepted(self.generated, self.steps)),
                ("drafting_seconds_total", "counter", "Time spent in the drafter (propose + observe).", self.draft_seconds),
                ("engine_seconds_total", "counter", "Time the worker spent in engine steps.", self.engine_seconds),
                ("engine_steps_total", "counter", "Engine steps (admission, then one pass over the live rows).",
                 self.engine_steps),
                ("step_rows_total", "counter", "Rows over all engine steps (divided by the steps: rows per pass).",
                 self.step_rows),
                ("admitted_requests_total", "counter", "Requests that joined the running engine.", self.admitted_jobs),
                ("admitted_rows_total", "counter", "Rows that joined the running engine.", self.admitted_rows),
                ("queue_wait_seconds_total", "counter", "Time admitted requests waited for room.", self.queue_seconds),
                ("queue_depth", "gauge", "Requests waiting for room in the engine.", queue_depth),
                ("live_rows", "gauge", "Rows decoding now.", live_rows),
                ("model_loaded", "gauge", "1 once the model is loaded.", int(ready)),
                ("memory_budget_bytes", "gauge", "The most memory the server may hold: its own at start plus what "
                 "requests may take.", self.memory_ceiling),
                ("memory_reserved_bytes", "gauge", "Memory the running requests may take (their footprint).",
                 self.memory_reserved),
                ("drafter_groups", "gauge", "Drafter groups held (a request's tables; a shared table not counted).",
                 self.drafter_groups),
            ]
        for name, kind, help_, value in rows:
            lines += [f"# HELP stand_{name} {help_}", f"# TYPE stand_{name} {kind}", f"stand_{name} {value}"]
        return "\n".join(lines) + "\n"
