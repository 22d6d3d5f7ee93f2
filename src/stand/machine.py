"""This machine: what one verification pass costs here, by rows and tokens per row, measured once per
(model, backend, dtype, threads, CPU) and cached under the stand cache directory.

The cost grid sizes every row's draft tree (core/budget.py). Grids measured on another CPU, another thread
count or another backend are never used for this one: its shape, not only its scale, differs by machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass

import torch

from stand.backends.load import cpu_flags
from stand.backends.protocol import Backend
from stand.core.budget import GRID_MAX_TOKENS, GRID_ROWS, GRID_TOKENS, CostGrid
from stand.core.files import cache_dir
from stand.core.tree import DraftTree

TOKENS = (1, 2, 4, 8, 16, 32, 64)
BATCHES = (4, 8, 16)
GRID_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma", "f16c")


@dataclass
class ProfileConfig:
    tokens: tuple[int, ...] = TOKENS
    batches: tuple[int, ...] = BATCHES
    cache_len: int = 500
    reps: int = 10
    warmup: int = 2


def binary_tree(nodes: int) -> DraftTree:
    """A tree of `nodes` nodes counting the root: draft node i hangs under node (i - 1) // 2."""
    tree = DraftTree()
    for i in range(nodes - 1):
        tree.add(100 + i, (i - 1) // 2 if i else -1)
    return tree


class Probe:
    """A cache of cache_len tokens in `rows` rows, and one timed forward of a tree per row on top of it."""

    def __init__(self, target: Backend, rows: int, cache_len: int):
        self.rows = rows
        self.cache = target.new_cache()
        prompt = [(7 * i + 3) % max(target.vocab_size - 1, 2) for i in range(cache_len)]
        self.cache.prefill([prompt] * rows)

    @torch.inference_mode()
    def time_ms(self, nodes: int) -> float:
        """One forward of `nodes` new tokens per row; the cache keeps the root only, so it grows by one."""
        t = time.perf_counter()
        self.cache.step([binary_tree(nodes)] * self.rows, [11] * self.rows)
        ms = 1000 * (time.perf_counter() - t)
        self.cache.commit([[0]] * self.rows)
        return ms


def interleaved(probes: dict[str, Probe], nodes: int, cfg: ProfileConfig) -> dict[str, float]:
    """Median ms per backend, one forward of each backend in turn."""
    times: dict[str, list[float]] = {name: [] for name in probes}
    for i in range(cfg.warmup + cfg.reps):
        for name, probe in probes.items():
            ms = probe.time_ms(nodes)
            if i >= cfg.warmup:
                times[name].append(ms)
    return {name: statistics.median(ts) for name, ts in times.items()}


def threads(target: Backend) -> int:
    return int(getattr(target, "threads", None) or torch.get_num_threads())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def machine_key(target: Backend) -> dict:
    """What a grid depends on: the model, the backend and its compute type, threads, the CPU and its flags."""
    return {"model": target.name, "backend": target.kind, "dtype": str(target.dtype).replace("torch.", ""),
            "weights": target.fingerprint(), "threads": threads(target), "cpu": cpu_model(),
            "cpu_flags": sorted(set(GRID_CPU_FLAGS) & cpu_flags())}


def grid_path(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "grids", f"{key['backend']}-{digest}.json")


def machine_grid(target: Backend) -> CostGrid:
    """This machine's grid for the target: from the cache, else measured now (a few seconds) and cached."""
    key = machine_key(target)
    path = grid_path(key)
    if os.path.exists(path):
        try:
            grid = CostGrid.load(path)
            if grid.meta.get("machine") == key:
                return grid
        except ValueError:
            pass  # unreadable: measure again
    from tqdm.auto import tqdm

    with tqdm(total=len(GRID_ROWS), desc=f"measuring this machine ({target.kind})", unit="rows", leave=False) as bar:
        grid = measure_grid(target, progress=lambda _: bar.update(1))
    grid.meta["machine"] = key
    grid.save(path)
    return grid


@torch.inference_mode()
def measure_grid(target: Backend, rows=GRID_ROWS, tokens=GRID_TOKENS, reps: int = 3, cache_len: int = 300,
                 progress=None) -> CostGrid:
    """Median ms per forward for every (rows, tokens per row) with rows x tokens <= GRID_MAX_TOKENS."""
    cfg = ProfileConfig(reps=reps, warmup=1)
    ms: dict[int, dict[int, float]] = {}
    for b in rows:
        probe = {"ours": Probe(target, b, cache_len)}
        ms[b] = {t: interleaved(probe, t, cfg)["ours"] for t in tokens if b * t <= GRID_MAX_TOKENS}
        if progress:
            progress(f"{b} rows")
    return CostGrid(ms, {"model": target.name, "dtype": str(target.dtype).replace("torch.", ""),
                         "cache_len": cache_len, "threads": threads(target), "measured": time.time()})
