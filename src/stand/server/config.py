"""The server's configuration: which model and drafter it serves, where it listens, how it batches."""

from __future__ import annotations

import os
from dataclasses import dataclass

from stand.backends.load import BACKENDS
from stand.errors import StandError
from stand.params import SpecConfig, check_method

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"  # /v1/models' id for the embedded default model


@dataclass
class ServerConfig:
    model: str | None = None  # HF directory or .gguf; None = the embedded default
    method: str = "stand"
    dtype: str = "auto"
    backend: str = "auto"  # "auto", "torch" or "llama.cpp" (see backends/load.py)
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
        check_method(self.method)
        if self.backend not in BACKENDS:
            raise StandError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
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
        return os.path.basename(self.model.rstrip("/")) if self.model else DEFAULT_MODEL_ID

    def spec(self) -> SpecConfig:
        return SpecConfig(method=self.method, share_across_prompts=self.share_table or bool(self.table),
                          table_path=self.table).validate()
