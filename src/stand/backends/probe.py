"""Timing a backend's verification passes: one pass of a tree per row over a filled cache, and the cost grid
(rows x tokens per row) measured so that load from other processes shows instead of silently skewing it.

A grid measured while another process loads the CPU is wrong in shape, not only in scale: load inflates a cheap
pass more, in proportion, than a wide one, so wide passes look cheap beside it and the sizer drafts where drafting
does not pay (measured: docs/results.md#llamacpp-pass-cost-by-weight-type). So: every shape is timed `reps` times
in rounds that visit all shapes (load that comes and goes hits them alike) and the fastest repeat is kept (load
only ever adds time); and the machine counts as busy when one reference pass is slower or faster at the end than at
the start, or when other processes used CPU time this process needed. A busy grid is for the run that measured it
only (machine.py does not cache it).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from stand.backends.protocol import Backend
from stand.core.cost import GRID_MAX_TOKENS, GRID_ROWS, GRID_TOKENS, CostGrid
from stand.core.tree import DraftTree

TOKENS = (1, 2, 4, 8, 16, 32, 64)
BATCHES = (4, 8, 16)
REFERENCE_TOKENS = 1  # the reference pass: one row, one token (plain decoding)
CpuSeconds = Callable[[], "tuple[float, float] | None"]


def binary_tree(nodes: int) -> DraftTree:
    """A tree of `nodes` nodes counting the root: draft node i hangs under node (i - 1) // 2."""
    tree = DraftTree()
    for i in range(nodes - 1):
        tree.add(100 + i, (i - 1) // 2 if i else -1)
    return tree


def threads(target: Backend) -> int:
    """Threads the backend computes with."""
    return int(getattr(target, "threads", None) or torch.get_num_threads())


class Probe:
    """A cache of cache_len tokens in `rows` rows, and one timed forward of a tree per row on top of it."""

    def __init__(self, target: Backend, rows: int, cache_len: int, clock: Callable[[], float] = time.perf_counter):
        self.rows, self.clock = rows, clock
        self.cache = target.new_cache()
        prompt = [(7 * i + 3) % max(target.vocab_size - 1, 2) for i in range(cache_len)]
        self.cache.prefill([prompt] * rows)

    @torch.inference_mode()
    def time_ms(self, nodes: int) -> float:
        """One forward of `nodes` new tokens per row; the cache keeps the root only, so it grows by one."""
        t = self.clock()
        self.cache.step([binary_tree(nodes)] * self.rows, [11] * self.rows)
        ms = 1000 * (self.clock() - t)
        self.cache.commit([[0]] * self.rows)
        return ms


@dataclass
class ProfileConfig:
    """`stand profile`'s curves: ours beside Hugging Face, by new tokens and by batch size."""

    tokens: tuple[int, ...] = TOKENS
    batches: tuple[int, ...] = BATCHES
    cache_len: int = 500
    reps: int = 10
    warmup: int = 2


def interleaved(probes: dict[str, Probe], nodes: int, cfg: ProfileConfig) -> dict[str, float]:
    """Median ms per backend, one forward of each backend in turn."""
    times: dict[str, list[float]] = {name: [] for name in probes}
    for i in range(cfg.warmup + cfg.reps):
        for name, probe in probes.items():
            ms = probe.time_ms(nodes)
            if i >= cfg.warmup:
                times[name].append(ms)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, stolen time included; CPU seconds of this process) so far.
    None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


@dataclass
class GridConfig:
    """How a cost grid is measured, and when the machine counts as busy. The clocks are injectable (tests)."""

    rows: tuple[int, ...] = GRID_ROWS
    tokens: tuple[int, ...] = GRID_TOKENS
    reps: int = 3  # timed forwards per shape; the fastest counts
    warmup: int = 1  # untimed rounds first
    cache_len: int = 300
    busy_ratio: float = 1.25  # the reference pass at the end this much slower (or faster) than at the start: busy
    busy_cores: float = 0.25  # other processes used this many cores more than the ones we leave free: busy
    clock: Callable[[], float] = time.perf_counter  # seconds, wall
    cpu: CpuSeconds = cpu_seconds
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)


def fastest(probe: Probe, sizes: list[int], cfg: GridConfig) -> dict[int, float]:
    """The least ms of cfg.reps forwards per size, timed in rounds that visit every size once (alternating
    direction, so a drift in speed hits small and large sizes alike), after cfg.warmup untimed rounds."""
    times: dict[int, list[float]] = {t: [] for t in sizes}
    for i in range(cfg.warmup + cfg.reps):
        for t in sizes if i % 2 == 0 else sizes[::-1]:
            ms = probe.time_ms(t)
            if i >= cfg.warmup:
                times[t].append(ms)
    return {t: min(ts) for t, ts in times.items()}


@dataclass
class Watch:
    """What the rest of the machine did while a grid was measured: the reference pass before and after, the wall
    time and the CPU time the machine and this process spent."""

    cfg: GridConfig
    threads: int
    reference: list[float] = field(default_factory=list)  # [before, after] ms

    def start(self) -> None:
        self.wall, self.cpu = self.cfg.clock(), self.cfg.cpu()

    def others_cores(self) -> float | None:
        """Cores other processes kept busy on average since start (None: unknown)."""
        now = self.cfg.cpu()
        if self.cpu is None or now is None:
            return None
        wall = max(self.cfg.clock() - self.wall, 1e-9)
        return max((now[0] - self.cpu[0]) - (now[1] - self.cpu[1]), 0.0) / wall

    def busy(self) -> str | None:
        """Why the measurement looks disturbed, or None."""
        before, after = (max(ms, 1e-9) for ms in self.reference)
        if max(after / before, before / after) > self.cfg.busy_ratio:
            return f"one row of one token took {before:.1f} ms at the start and {after:.1f} ms at the end"
        others, free = self.others_cores(), max(self.cfg.cpus - self.threads, 0)
        if others is not None and others > free + self.cfg.busy_cores:
            return f"other processes kept {others:.1f} of {self.cfg.cpus} cores busy ({self.threads} threads measuring)"
        return None


def reference_ms(target: Backend, cfg: GridConfig) -> float:
    """The reference pass (one row of REFERENCE_TOKENS) on a fresh cache of cfg.cache_len tokens: a backend may hold
    one cache at a time (llama.cpp), and the same cache length makes the start and the end comparable."""
    return fastest(Probe(target, 1, cfg.cache_len, cfg.clock), [REFERENCE_TOKENS], cfg)[REFERENCE_TOKENS]


@torch.inference_mode()
def measure_grid(target: Backend, cfg: GridConfig | None = None, progress=None) -> CostGrid:
    """Least ms per forward for every (rows, tokens per row) with rows x tokens <= GRID_MAX_TOKENS (see the module
    docstring). meta["busy"]: why the machine looked busy while measuring, or None."""
    cfg = cfg or GridConfig()
    watch = Watch(cfg, threads(target))
    watch.start()
    watch.reference.append(reference_ms(target, cfg))
    ms: dict[int, dict[int, float]] = {}
    for b in cfg.rows:
        sizes = [t for t in cfg.tokens if b * t <= GRID_MAX_TOKENS]
        ms[b] = fastest(Probe(target, b, cfg.cache_len, cfg.clock), sizes, cfg)
        if progress:
            progress(f"{b} rows")
    watch.reference.append(reference_ms(target, cfg))
    meta = {"model": target.name, "dtype": str(target.dtype).replace("torch.", ""), "cache_len": cfg.cache_len,
            "threads": watch.threads, "measured": time.time(), "reference_ms": watch.reference, "busy": watch.busy()}
    return CostGrid(ms, meta)
