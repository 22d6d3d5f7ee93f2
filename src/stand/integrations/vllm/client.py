"""The stand side of worker.py: vLLM started once in a subprocess (under vLLM's interpreter), then asked for
samples request by request. Its log goes to a file; a failure shows the log's tail."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field

from stand.errors import StandError
from stand.integrations.vllm.launch import speculative_config, vllm_env, vllm_python

LOG_TAIL = 3000  # characters of the worker's log shown with an error


@dataclass
class EngineConfig:
    model: str  # a Hugging Face directory (launch.hf_dir)
    method: str = "vllm"  # a launch.METHODS name: which speculative config
    dtype: str = "auto"
    k: int = 5  # num_speculative_tokens
    max_model_len: int = 4096
    seed: int = 0
    eager: bool = True
    max_num_seqs: int = 64  # rows vLLM decodes at once
    tokenizer: bool = True  # False: the directory has no tokenizer (vLLM then takes and returns ids only)
    in_process: bool = True  # vLLM's engine core in the worker's process (False: vLLM's own subprocess and CPU binding)
    env: dict = field(default_factory=dict)  # extra environment (e.g. STAND_VLLM_OPTIONS)

    def engine_line(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "max_model_len": self.max_model_len, "seed": self.seed,
                "eager": self.eager, "speculative_config": speculative_config(self.method, self.k),
                "max_num_seqs": self.max_num_seqs, "tokenizer": self.tokenizer}


@dataclass
class Reply:
    outputs: list[list[list[int]]]  # [prompt][sample] new token ids
    seconds: float  # vLLM's generate, wall time
    spec: dict  # speculative counters of the call: num_drafts, num_draft_tokens, num_accepted_tokens, draft_seconds


class VllmProcess:
    """One vLLM engine in a subprocess; `generate` sends a request and waits for its samples."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"stand-{config.method}-", suffix=".log", delete=False)
        env = {**vllm_env(config.in_process), **config.env}
        self.proc = subprocess.Popen([vllm_python(), "-m", "stand.integrations.vllm.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.version = self._send(config.engine_line()).get("vllm")

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False) -> Reply:
        req = {"prompts": prompts, "n": n, "temperature": temperature, "top_p": top_p, "top_k": top_k,
               "max_tokens": max_tokens, "seed": seed, "stop_token_ids": stop_token_ids or [], "ignore_eos": ignore_eos}
        answer = self._send(req)
        return Reply(answer["outputs"], answer["seconds"], answer.get("spec", {}))

    def _send(self, doc: dict) -> dict:
        if self.proc.poll() is not None:
            raise StandError(f"the vLLM worker ({self.config.method}) has exited: {self.tail()}")
        self.proc.stdin.write(json.dumps(doc) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise StandError(f"the vLLM worker ({self.config.method}) stopped: {self.tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise StandError(f"vLLM ({self.config.method}): {answer['error']}")
        return answer

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            text = f.read()
        return f"...{text[-LOG_TAIL:]} (log: {self.log.name})" if len(text) > LOG_TAIL else text

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        if exc[0] is None:
            os.unlink(self.log.name)
