"""The benchmark: methods side by side on the same problems, in one process, interleaved."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from .api import generate
from .datasets import load_dataset
from .errors import StandError
from .models import Target

HF_METHODS = ("hf", "hf-pld", "hf-batched")


@dataclass
class BenchConfig:
    methods: list[str] = field(default_factory=lambda: ["none", "pld"])
    dataset: str = "champ"
    problems: int = 4
    n: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 256
    seed: int = 0
    schedule: str = "batched"


@dataclass
class Tally:
    """What one method produced over all problems."""

    method: str
    new_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    draft_seconds: float = 0.0

    def add(self, new_tokens: int, seconds: float, steps: int, draft_seconds: float = 0.0) -> None:
        self.new_tokens += new_tokens
        self.seconds += seconds
        self.steps += steps
        self.draft_seconds += draft_seconds


def hf_generate(target: Target, prompt_ids: list[int], method: str, n: int, temperature: float,
                max_new_tokens: int, seed: int) -> tuple[int, int]:
    """Hugging Face generate as a user would call it; returns (new tokens, forward passes)."""
    ids = torch.tensor([prompt_ids])
    kw = dict(max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(ids),
              pad_token_id=target.tokenizer.pad_token_id or min(target.eos_ids))
    kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else kw.update(do_sample=False)
    if method == "hf-pld":
        kw["prompt_lookup_num_tokens"] = 10
    torch.manual_seed(seed)
    with torch.inference_mode():
        if method == "hf-batched":
            out = target.model.generate(ids, num_return_sequences=n, **kw)
            return _count_new(target, out, len(prompt_ids)), 0
        total = 0
        for _ in range(n):
            out = target.model.generate(ids, **kw)
            total += _count_new(target, out, len(prompt_ids))
    return total, 0


def _count_new(target: Target, out: torch.Tensor, prompt_len: int) -> int:
    """New tokens per returned sequence, up to and including the first EOS (padding after it excluded)."""
    total = 0
    for seq in out[:, prompt_len:].tolist():
        ends = [i for i, t in enumerate(seq) if t in target.eos_ids]
        total += ends[0] + 1 if ends else len(seq)
    return total


def run_method(target: Target, method: str, prompt: str, cfg: BenchConfig, tally: Tally) -> None:
    if method in HF_METHODS:
        ids = target.encode(prompt)
        t = time.perf_counter()
        new, steps = hf_generate(target, ids, method, cfg.n, cfg.temperature, cfg.max_new_tokens, cfg.seed)
        tally.add(new, time.perf_counter() - t, steps)
        return
    t = time.perf_counter()
    samples = generate(prompt, model=target, n=cfg.n, method=method, temperature=cfg.temperature,
                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, schedule=cfg.schedule)[0]
    seconds = time.perf_counter() - t
    tally.add(sum(s.stats["new_tokens"] for s in samples), seconds, sum(s.stats["steps"] for s in samples),
              sum(s.stats["draft_seconds"] for s in samples))


def bench(target: Target, cfg: BenchConfig, progress=None) -> list[dict]:
    """Every method on every problem, interleaved problem by problem; one row per method."""
    problems = load_dataset(cfg.dataset, cfg.problems)
    tallies = {m: Tally(m) for m in cfg.methods}
    for p in problems:
        for m in cfg.methods:
            run_method(target, m, p.prompt, cfg, tallies[m])
            if progress:
                progress()
    return summarise(tallies, cfg, target)


def summarise(tallies: dict[str, Tally], cfg: BenchConfig, target: Target) -> list[dict]:
    rows = []
    base = tallies.get("none")
    base_tps = base.new_tokens / base.seconds if base and base.seconds else None
    for m, t in tallies.items():
        tps = t.new_tokens / t.seconds if t.seconds else 0.0
        rows.append({
            "method": m, "dataset": cfg.dataset, "problems": cfg.problems, "max_new_tokens": cfg.max_new_tokens,
            "schedule": cfg.schedule if m not in HF_METHODS else "hf", "dtype": str(target.dtype).split(".")[-1],
            "n": cfg.n, "temperature": cfg.temperature, "new_tokens": t.new_tokens, "seconds": round(t.seconds, 3),
            "tok_per_s": round(tps, 2), "speedup_vs_none": round(tps / base_tps, 3) if base_tps else None,
            "mean_accepted": round(t.new_tokens / t.steps, 3) if t.steps else None,
            "draft_seconds": round(t.draft_seconds, 3),
        })
    return rows


def check_methods(methods: list[str]) -> None:
    from .drafters import DRAFTERS

    bad = [m for m in methods if m not in DRAFTERS and m not in HF_METHODS]
    if bad:
        raise StandError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(sorted(DRAFTERS) + list(HF_METHODS))}")


def write_json(rows: list[dict], path: str) -> None:
    """A list of rows, one per method (each row carries its configuration)."""
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
