"""The `auto` schedule: the faster of batched and sequential for this model, method, N and machine,
found by a short timed probe of both and cached in cache_dir()/schedule.json."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import torch

from stand.api import SCHEDULES, Target, make_engine, run_group
from stand.core import files
from stand.core.sequence import Row
from stand.errors import StandError
from stand.machine import cpu_model
from stand.params import SamplingParams, SpecConfig

PROBE_TOKENS = 48


def schedule_key(target: Target, method: str, n: int, params: SamplingParams) -> str:
    """What the faster schedule depends on: model, backend, dtype, method, N, greedy or not, threads, CPU, torch."""
    return json.dumps({"model": target.name, "backend": target.kind, "dtype": str(target.dtype), "method": method,
                       "n": n, "sampled": not params.greedy, "threads": torch.get_num_threads(), "cpu": cpu_model(),
                       "torch": torch.__version__}, sort_keys=True)


def cache_path() -> str:
    return os.path.join(files.cache_dir(), "schedule.json")


def known_choices() -> dict:
    """The cached choices; an unreadable cache counts as empty (it is measured again and rewritten)."""
    if not os.path.exists(cache_path()):
        return {}
    try:
        doc = files.read_json(cache_path(), "the schedule cache")
    except StandError:
        return {}
    return doc if isinstance(doc, dict) else {}


def probe(target: Target, spec: SpecConfig, n: int, params: SamplingParams, prompt_ids: list[int],
          schedule: str, tokens: int = PROBE_TOKENS) -> float:
    """Tokens per second of n samples of `tokens` tokens each under one schedule (a fresh drafter)."""
    p = replace(params, max_new_tokens=tokens, stop=[], ignore_eos=True)
    rows = [Row(prompt_ids, p, group=0, index=j) for j in range(n)]
    engine = make_engine(target, spec)
    t = time.perf_counter()
    run_group(engine, rows, schedule)
    return sum(r.stats.new_tokens for r in rows) / (time.perf_counter() - t)


def choose_schedule(target: Target, spec: SpecConfig, n: int, params: SamplingParams, prompt_ids: list[int],
                    tokens: int = PROBE_TOKENS) -> str:
    """The faster of batched and sequential here, measured once and cached."""
    if n == 1:
        return "batched"  # one sample: the two are the same
    key = schedule_key(target, spec.method, n, params)
    known = known_choices()
    if isinstance(known.get(key), dict) and known[key].get("schedule") in SCHEDULES:
        return known[key]["schedule"]
    probe(target, spec, 1, params, prompt_ids, "batched", 4)  # warm-up
    speed = {s: probe(target, spec, n, params, prompt_ids, s, tokens) for s in SCHEDULES}
    choice = max(speed, key=speed.get)
    known[key] = {"schedule": choice, "tok_per_s": speed, "probe_tokens": tokens, "measured": time.time()}
    files.write_json(cache_path(), known)
    return choice
