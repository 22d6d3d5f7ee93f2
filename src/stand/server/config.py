"""The server's configuration: which model and drafter it serves, where it listens, and what one request may
ask for. Imports nothing heavy (the `stand serve --help` text is computed from these defaults)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from stand.errors import StandError
from stand.methods import check_method
from stand.params import SpecConfig

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"  # /v1/models' id for the embedded default model
LIMITS = ("default_max_tokens", "max_tokens_limit", "max_n", "max_prompt_tokens", "max_live_rows", "max_body_bytes")


@dataclass
class ServerConfig:
    model: str | None = None  # HF directory or .gguf; None = the embedded default
    method: str = "stand"
    dtype: str = "auto"
    backend: str = "auto"  # "auto", "torch" or "llama.cpp" (see backends/load.py)
    device: str = "auto"  # the torch backend's: "auto", "cpu" or "cuda"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    table: str | None = None  # n-gram table file: loaded at start, saved on shutdown (implies share_table)
    share_table: bool = False  # one drafter table for every request
    served_name: str | None = None  # the model id reported by /v1/models
    cost: str | None = None  # what a pass costs (SpecConfig.cost_grid): None measures this machine's grid once
    # ---- what one request may ask for (beyond: 400 naming the field) and what runs at once
    max_queue: int = 64  # requests waiting for room in the engine; more get 429
    default_max_tokens: int = 512  # for a request that gives no max_tokens (both endpoints)
    max_tokens_limit: int = 4096  # the most max_tokens a request may ask for
    max_n: int = 16  # the most rows (samples) per request: n, times the prompts of a completions request
    max_prompt_tokens: int = 4096  # the longest prompt (a prompt over the model's context: 413)
    max_live_rows: int = 64  # rows decoding at once; requests beyond wait in the queue
    max_live_tokens: int | None = None  # KV tokens reserved by running requests; None: the llama.cpp cache's size
    memory_budget_mib: int | None = None  # memory the running requests may take together; None: 80% of the free
    max_body_bytes: int = 1 << 20  # the largest request body (beyond: 413)

    def validate(self) -> "ServerConfig":
        from stand.backends.load import BACKENDS, DEVICES, DTYPES  # here: importing it loads torch

        check_method(self.method)
        for name, value, choices in (("backend", self.backend, BACKENDS), ("dtype", self.dtype, DTYPES),
                                     ("device", self.device, DEVICES)):
            if value not in choices:
                raise StandError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise StandError(f"port must be in 0..65535, got {self.port}")
        if self.model is not None and not os.path.exists(self.model):
            raise StandError(f"model path does not exist: {self.model}")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise StandError(f"max_queue must be >= 1 (requests that may wait for room), got {self.max_queue!r}")
        optional = tuple(n for n in ("max_live_tokens", "memory_budget_mib") if getattr(self, n) is not None)
        for name in LIMITS + optional:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise StandError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise StandError(f"default_max_tokens ({self.default_max_tokens}) is over max_tokens_limit "
                             f"({self.max_tokens_limit})")
        if self.max_n > self.max_live_rows:
            raise StandError(f"max_n ({self.max_n}) is over max_live_rows ({self.max_live_rows}): such a request "
                             "could never run")
        if self.table:
            from stand.drafters.ngram_table import check_table_path

            check_table_path(self.table)  # a directory, or a file that is not a table: refused before listening
        if self.cost not in (None, "off", "tree"):
            from stand.core.cost import CostGrid

            CostGrid.load(self.cost)
        self._check_model()
        return self

    def _check_model(self) -> None:
        """What can be told of the model before loading it: a .gguf file that is not one, and the rows llama.cpp
        can hold at once."""
        from stand.backends.llamacpp import MAX_SEQUENCES
        from stand.backends.load import backend_candidates, check_path, default_model_path, resolve_device

        path = check_path(self.model or default_model_path())
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise StandError(f"{path} is not a GGUF file (it does not start with GGUF)")
        only = backend_candidates(path, self.backend, resolve_device(self.device))
        if only == ["llama.cpp"] and self.max_live_rows > MAX_SEQUENCES:
            raise StandError(f"max_live_rows ({self.max_live_rows}) is over what llama.cpp holds at most "
                             f"({MAX_SEQUENCES} sequences): give --backend torch")

    @property
    def model_id(self) -> str:
        if self.served_name:
            return self.served_name
        return os.path.basename(self.model.rstrip("/")) if self.model else DEFAULT_MODEL_ID

    @property
    def shared_table(self) -> bool:
        return self.share_table or bool(self.table)

    def spec(self) -> SpecConfig:
        return SpecConfig(method=self.method, share_across_prompts=self.shared_table, table_path=self.table,
                          cost_grid=self.cost).validate()


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def startup_warnings(config: ServerConfig) -> list[str]:
    """What `serve` warns about before it listens."""
    if config.api_key or is_loopback(config.host):
        return []
    return [f"listening on {config.host} (not loopback) without --api-key: anyone who can reach port "
            f"{config.port} can use this server"]
