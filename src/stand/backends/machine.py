"""This machine: what one verification pass costs here, by rows and tokens per row, measured once per
(model, backend, dtype, threads, CPU) and cached under the stand cache directory (`--dtype auto` and
`--backend auto` build on it: choice.py).

The cost grid sizes every row's draft tree (core/cost.py). Grids measured on another CPU, another thread
count or another backend are never used for this one: its shape, not only its scale, differs by machine. A
grid measured while the machine was busy (backends/probe.py) is used for the run that measured it and not
cached, so the next run measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform

from stand.backends.probe import GridConfig, measure_grid, threads
from stand.backends.protocol import Backend
from stand.core.cost import CostGrid
from stand.core.files import cache_dir
from stand.errors import StandError

GRID_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma", "f16c")
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

GRID_METHOD = 5  # how grids are measured (2: fastest of interleaved rounds, busy machines not cached; 3: the lean
# forward's bfloat16 one-query attention; 4: int4 and measured backend choices; 5: int4's float32 cache): older grids
# and choices are measured again


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


# ---- the model ----------------------------------------------------------------------------------------

def model_identity(path: str) -> dict:
    """What a model's speed depends on, read without loading it: a directory's config.json (hashed), or a file's
    name and size."""
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json"), "rb") as f:
            return {"config": hashlib.sha256(f.read()).hexdigest()[:16]}
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path)}
