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
    n: int | list[int] = 1  # several values: a row per (method, n, schedule)
    temperature: float = 0.0
    max_new_tokens: int = 256
    seed: int = 0
    schedule: str | list[str] = "batched"  # for n > 1; several: a row per schedule

    def __post_init__(self):
        self.ns = [self.n] if isinstance(self.n, int) else list(self.n)
        self.schedules = [self.schedule] if isinstance(self.schedule, str) else list(self.schedule)

    def variants(self) -> list[tuple[str, int, str]]:
        """(method, n, schedule) of every row; n=1 and Hugging Face methods have one schedule."""
        out = []
        for n in self.ns:
            for m in self.methods:
                one = n == 1 or m in HF_METHODS
                out += [(m, n, "hf" if m in HF_METHODS else s) for s in (self.schedules[:1] if one else self.schedules)]
        return out


@dataclass
class Tally:
    """What one method produced over all problems."""

    method: str
    n: int = 1
    schedule: str = "batched"
    new_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    draft_seconds: float = 0.0
    judged: int = 0  # problems with a reference answer and the method's samples
    correct: int = 0  # of those, where the majority-voted answer matches the reference

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


def run_method(target: Target, method: str, prompt: str, cfg: BenchConfig, tally: Tally,
               reference: str | None = None) -> None:
    if method in HF_METHODS:
        ids = target.encode(prompt)
        t = time.perf_counter()
        new, steps = hf_generate(target, ids, method, tally.n, cfg.temperature, cfg.max_new_tokens, cfg.seed)
        tally.add(new, time.perf_counter() - t, steps)
        return
    t = time.perf_counter()
    samples = generate(prompt, model=target, n=tally.n, method=method, temperature=cfg.temperature,
                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, schedule=tally.schedule)[0]
    seconds = time.perf_counter() - t
    tally.add(sum(s.stats["new_tokens"] for s in samples), seconds, sum(s.stats["steps"] for s in samples),
              sum(s.stats["draft_seconds"] for s in samples))
    if reference is not None:
        from .tts import extract_answer, is_correct, majority_vote

        tally.judged += 1
        tally.correct += bool(is_correct(majority_vote([extract_answer(s.text) for s in samples]).answer, reference))


def bench(target: Target, cfg: BenchConfig, progress=None) -> list[dict]:
    """Every method on every problem, interleaved problem by problem; one row per method."""
    problems = load_dataset(cfg.dataset, cfg.problems)
    tallies = {v: Tally(*v) for v in cfg.variants()}
    for p in problems:
        for v, tally in tallies.items():
            run_method(target, v[0], p.prompt, cfg, tally, p.answer)
            if progress:
                progress()
    return summarise(tallies, cfg, target)


def summarise(tallies: dict[tuple, Tally], cfg: BenchConfig, target: Target) -> list[dict]:
    """One row per (method, n, schedule); speedup against the fastest `none` schedule at the same n."""
    rows = []
    for (m, n, schedule), t in tallies.items():
        bases = [b.new_tokens / b.seconds for b in tallies.values() if b.method == "none" and b.n == n and b.seconds]
        base_tps = max(bases) if bases else None
        tps = t.new_tokens / t.seconds if t.seconds else 0.0
        rows.append({
            "method": m, "dataset": cfg.dataset, "problems": cfg.problems, "max_new_tokens": cfg.max_new_tokens,
            "schedule": schedule, "dtype": str(target.dtype).split(".")[-1],
            "n": n, "temperature": cfg.temperature, "new_tokens": t.new_tokens, "seconds": round(t.seconds, 3),
            "tok_per_s": round(tps, 2), "speedup_vs_none": round(tps / base_tps, 3) if base_tps else None,
            "mean_accepted": round(t.new_tokens / t.steps, 3) if t.steps else None,
            "draft_seconds": round(t.draft_seconds, 3),
            "accuracy": round(t.correct / t.judged, 3) if t.judged else None,
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
