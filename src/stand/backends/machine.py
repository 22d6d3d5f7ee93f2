"""This machine: what one verification pass costs here, by rows and tokens per row, measured once per
(model, backend, dtype, threads, CPU) and cached under the stand cache directory; and, for `--dtype auto` on
torch, which of bfloat16 and float32 runs faster here, measured once per (model, forward, threads, CPU).

The cost grid sizes every row's draft tree (core/cost.py). Grids measured on another CPU, another thread
count or another backend are never used for this one: its shape, not only its scale, differs by machine. A
grid measured while the machine was busy (backends/probe.py) is used for the run that measured it and not
cached, so the next run measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from typing import Callable

import torch

from stand.backends.probe import GridConfig, measure_grid, threads
from stand.backends.protocol import Backend, pads
from stand.core.cost import CostGrid
from stand.core.files import cache_dir, read_json, write_json
from stand.errors import StandError

GRID_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma", "f16c")
DTYPES = ("bfloat16", "float32")  # what `--dtype auto` chooses between on torch
log = logging.getLogger("stand")
_this_run: dict[str, CostGrid] = {}  # grid path -> a grid measured on a busy machine: for this process only


# ---- the CPU -------------------------------------------------------------------------------------------

def cpu_info(field: str) -> str | None:
    """A field of /proc/cpuinfo's first processor ("model name", "flags"); None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.split(":", 1)[0].strip() == field), None)
    except OSError:
        return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where they cannot be read)."""
    return set((cpu_info("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name (the architecture where /proc/cpuinfo has none, e.g. on ARM)."""
    return cpu_info("model name") or platform.machine() or "unknown"


def cpu_key() -> dict:
    """The CPU as a cache key: its model name and the flags that change which kernels run."""
    return {"cpu": cpu_model(), "cpu_flags": sorted(set(GRID_CPU_FLAGS) & cpu_flags())}


# ---- the cost grid -------------------------------------------------------------------------------------

GRID_METHOD = 3  # how grids are measured (2: fastest of interleaved rounds, busy machines not cached; 3: the lean
# forward's bfloat16 one-query attention): older grids and dtype choices are measured again


def machine_key(target: Backend) -> dict:
    """What a grid depends on: the model, the backend and its compute type, threads, the CPU and its flags, and how
    it is measured."""
    return {"model": target.name, "backend": target.kind, "dtype": str(target.dtype).replace("torch.", ""),
            "weights": target.fingerprint(), "threads": threads(target), **cpu_key(), "method": GRID_METHOD}


def grid_path(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "grids", f"{key['backend']}-{digest}.json")


def cached_grid(key: dict) -> CostGrid | None:
    """The grid measured for `key` earlier in this run or cached by an earlier one (None: not measured yet)."""
    path = grid_path(key)
    if path in _this_run:
        return _this_run[path]
    if os.path.exists(path):
        try:
            grid = CostGrid.load(path)
            if grid.meta.get("machine") == key:
                return grid
        except StandError:
            pass  # unreadable: measure again
    return None


def keep(grid: CostGrid, key: dict) -> CostGrid:
    """Caches a freshly measured grid; one measured on a busy machine is kept for this run only, with a warning."""
    grid.meta["machine"] = key
    path = grid_path(key)
    if grid.meta.get("busy"):
        log.warning("the cost grid of %s (%s, %s) was measured on a busy machine (%s): it is used for this run only "
                    "and will be measured again next time", key["model"], key["backend"], key["dtype"],
                    grid.meta["busy"])
        _this_run[path] = grid
    else:
        _this_run.pop(path, None)
        grid.save(path)
    return grid


def measure_here(target: Backend, cfg: GridConfig | None = None, progress=None) -> CostGrid:
    """Measures the target's grid now and keeps it (cached unless the machine was busy): `stand profile` re-measures
    with this."""
    return keep(measure_grid(target, cfg, progress), machine_key(target))


def machine_grid(target: Backend, cfg: GridConfig | None = None) -> CostGrid:
    """This machine's grid for the target: from this run or the cache, else measured now (a few seconds)."""
    grid = cached_grid(machine_key(target))
    if grid is not None:
        return grid
    from tqdm.auto import tqdm

    rows = (cfg or GridConfig()).rows
    with tqdm(total=len(rows), desc=f"measuring this machine ({target.kind})", unit="rows", leave=False) as bar:
        return measure_here(target, cfg, progress=lambda _: bar.update(1))


# ---- the dtype -----------------------------------------------------------------------------------------

def model_identity(path: str) -> dict:
    """What a model's speed depends on, read without loading it: a directory's config.json (hashed), or a file's
    name and size."""
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json"), "rb") as f:
            return {"config": hashlib.sha256(f.read()).hexdigest()[:16]}
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path)}


def dtype_key(path: str, forward: str) -> str:
    return json.dumps({**model_identity(path), "forward": forward, "threads": torch.get_num_threads(), **cpu_key(),
                       "torch": torch.__version__, "method": GRID_METHOD}, sort_keys=True)


def dtype_cache() -> str:
    return os.path.join(cache_dir(), "dtypes.json")


def known_dtypes() -> dict:
    """The cached choices; an unreadable cache counts as empty (measured again and rewritten)."""
    try:
        doc = read_json(dtype_cache(), "the dtype cache") if os.path.exists(dtype_cache()) else {}
    except StandError:
        return {}
    return doc if isinstance(doc, dict) else {}


def faster(grids: dict[str, CostGrid], padded: bool) -> str:
    """The dtype whose passes cost less here: the geometric mean, over the shapes both grids measured, of their
    ratio (each read as the engine runs it)."""
    a, b = (grids[d].with_padding(padded) for d in DTYPES)
    shapes = [(r, t) for r in a.ms for t in a.ms[r] if t in b.ms.get(r, {})]
    log_ratio = sum(math.log(a(r, t) / b(r, t)) for r, t in shapes) / max(len(shapes), 1)
    return DTYPES[0] if log_ratio <= 0 else DTYPES[1]


def fits_twice(target: Backend) -> bool:
    """Whether a float32 copy of the (bfloat16) target's weights fits in the memory available now, beside it."""
    model = getattr(target, "model", None)
    if model is None:
        return True
    need = sum(p.numel() * 4 for p in model.parameters())
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    return need < 0.8 * avail


def fastest_dtype(path: str, forward: str, open_model: Callable[[str, bool], Backend]) -> Backend:
    """`--dtype auto` on torch: the model in the dtype measured fastest on this machine. open_model(dtype, fresh)
    loads it (fresh: a copy of its own, for a candidate that may be dropped). The first time, both are loaded and
    their grids measured (a progress bar; the grids are kept as this machine's); the choice is cached."""
    key = dtype_key(path, forward)
    known = known_dtypes().get(key)
    if isinstance(known, dict) and known.get("dtype") in DTYPES:
        return open_model(known["dtype"], False)
    candidates, grids = measure_dtypes(open_model)
    choice = faster(grids, pads(candidates[DTYPES[0]])) if len(grids) == len(DTYPES) else DTYPES[0]
    busy = [g.meta["busy"] for g in grids.values() if g.meta.get("busy")]
    if busy:
        log.warning("%s was chosen on a busy machine (%s): for this run only, measured again next time", choice,
                    busy[0])
    else:
        doc = known_dtypes()
        doc[key] = {"dtype": choice, "measured": time.time(),
                    "reference_ms": {d: g.meta.get("reference_ms") for d, g in grids.items()}}
        write_json(dtype_cache(), doc)
    return candidates[choice]


def measure_dtypes(open_model: Callable[[str, bool], Backend]) -> tuple[dict[str, Backend], dict[str, CostGrid]]:
    """Loads the model in each dtype and measures its grid; float32 is skipped where it would not fit in memory."""
    from tqdm.auto import tqdm

    candidates, grids = {}, {}
    rows = len(GridConfig().rows)
    with tqdm(total=rows * len(DTYPES), desc="measuring bfloat16 and float32 here", unit="rows", leave=False) as bar:
        for dtype in DTYPES:
            target = open_model(dtype, True)
            candidates[dtype] = target
            grids[dtype] = measure_here(target, progress=lambda _: bar.update(1))
            if dtype == DTYPES[0] and not fits_twice(target):
                log.warning("float32 %s would not fit in memory beside bfloat16: bfloat16, unmeasured", target.name)
                break
    return candidates, grids
