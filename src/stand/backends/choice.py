"""`--dtype auto` and `--backend auto`: the engine (a backend and its compute type) that runs a model fastest on
this machine, measured the first time and cached.

Each candidate (llama.cpp; torch in bfloat16, float32 and, for a file of Q4 blocks, int4) is loaded and the one-row
part of its cost grid measured (a whole grid per candidate took minutes; the one chosen measures its whole grid
when a run first needs it, machine.py). Where the caller gives an end-to-end check (api.py: a short generation with
drafting sized by that one-row grid, tokens per second, best of two interleaved rounds), it decides: a grid says
what a pass costs, not what drafting makes of it. Without one, the grids decide (the geometric mean of their
ratios over the shapes all of them measured). The choice is cached per model, candidates, check, threads, CPU and
library versions; one made while the machine was busy is for that run only.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from stand.backends.machine import GRID_METHOD, cpu_key, model_identity
from stand.backends.probe import GridConfig, measure_grid
from stand.backends.protocol import Backend, pads
from stand.core.cost import CostGrid
from stand.core.files import cache_dir, read_json, write_json
from stand.errors import StandError

SPEED_ROUNDS = 2
log = logging.getLogger("stand")
Opener = Callable[[bool], Backend]  # fresh -> the candidate loaded (fresh: a copy of its own, droppable)


@dataclass(frozen=True)
class SpeedCheck:
    """An end-to-end check: tokens per second of a short generation on a loaded backend."""

    label: str  # what it runs (part of the cache key)
    run: Callable[[Backend, CostGrid], float]  # (backend, its one-row grid) -> tokens per second


# ---- the cache -----------------------------------------------------------------------------------------

def versions() -> dict:
    out = {"torch": torch.__version__}
    try:
        out["llama_cpp"] = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def choice_key(path: str, names: list[str], speed: SpeedCheck | None, extra: dict) -> str:
    import json

    return json.dumps({**model_identity(path), "candidates": names, "check": speed.label if speed else "grids",
                       **extra, "threads": torch.get_num_threads(), **cpu_key(), **versions(),
                       "method": GRID_METHOD}, sort_keys=True)


def choice_cache() -> str:
    return os.path.join(cache_dir(), "choices.json")


def known_choices() -> dict:
    """The cached choices; an unreadable cache counts as empty (measured again and rewritten)."""
    try:
        doc = read_json(choice_cache(), "the choice cache") if os.path.exists(choice_cache()) else {}
    except StandError:
        return {}
    return doc if isinstance(doc, dict) else {}


# ---- choosing ------------------------------------------------------------------------------------------

def by_grids(grids: dict[str, CostGrid], padded: dict[str, bool]) -> dict[str, float]:
    """Each candidate's geometric-mean cost relative to the first, over the shapes all grids measured (lower is
    faster; each grid read as the engine runs it)."""
    read = {n: g.with_padding(padded[n]) for n, g in grids.items()}
    first = next(iter(read.values()))
    shapes = [(r, t) for r in first.ms for t in first.ms[r] if all(t in g.ms.get(r, {}) for g in read.values())]
    return {n: math.exp(sum(math.log(g(r, t) / first(r, t)) for r, t in shapes) / max(len(shapes), 1))
            for n, g in read.items()}


def fits_beside(loaded: dict[str, Backend]) -> bool:
    """Whether a float32 copy of the model fits in the memory available now, beside the candidates loaded."""
    model = next((getattr(t, "model", None) for t in loaded.values() if isinstance(getattr(t, "model", None),
                                                                                torch.nn.Module)), None)
    if model is None:
        return True
    need = sum(p.numel() * 4 for p in model.parameters())
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    return need < 0.8 * avail


def load_all(options: dict[str, Opener]) -> tuple[dict[str, Backend], dict[str, CostGrid]]:
    """Every candidate that loads, with the one-row part of its grid; one that cannot run the model is left out
    with a warning."""
    from tqdm.auto import tqdm

    loaded, grids, failed = {}, {}, {}
    for name, opener in tqdm(options.items(), desc="loading and measuring the candidates", leave=False):
        if name == "torch float32" and not fits_beside(loaded):
            log.warning("auto: float32 would not fit in memory beside the other candidates: left out")
            continue
        try:
            loaded[name] = opener(True)
        except StandError as e:
            log.warning("auto: %s cannot run this model (%s): left out", name, e)
            failed[name] = str(e)
            continue
        grids[name] = measure_grid(loaded[name], GridConfig(rows=(1,)))
    if not loaded:
        raise StandError("no backend can run this model: " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    return loaded, grids


def speeds(loaded: dict[str, Backend], grids: dict[str, CostGrid], speed: SpeedCheck) -> dict[str, float]:
    """Tokens per second of each candidate: the best of SPEED_ROUNDS rounds that visit them all in turn, after
    an untimed run of each (tables, kernels and caches warm)."""
    from tqdm.auto import tqdm

    best = {n: 0.0 for n in loaded}
    with tqdm(total=len(loaded) * (SPEED_ROUNDS + 1), desc="measuring tokens/s here", leave=False) as bar:
        for r in range(SPEED_ROUNDS + 1):
            for n, t in (loaded.items() if r % 2 == 0 else reversed(loaded.items())):
                tok_s = speed.run(t, grids[n])
                best[n] = max(best[n], tok_s) if r else 0.0
                bar.update(1)
    return best


def choose(path: str, options: dict[str, Opener], speed: SpeedCheck | None, extra: dict) -> Backend:
    """The fastest candidate here, from the cache or measured now; its `choice` attribute says why, in a line."""
    key = choice_key(path, list(options), speed, extra)
    known = known_choices().get(key)
    if isinstance(known, dict) and known.get("engine") in options:
        target = options[known["engine"]](False)
        target.choice = f"auto: {known['engine']} ({known['why']}; measured here earlier, cached in {choice_cache()})"
        return target
    loaded, grids = load_all(options)
    if speed is not None:
        scores = speeds(loaded, grids, speed)
        name = max(scores, key=scores.get)
        why = "tokens/s with " + speed.label + ": " + ", ".join(f"{n} {v:.0f}" for n, v in scores.items())
    else:
        scores = by_grids(grids, {n: pads(t) for n, t in loaded.items()})
        name = min(scores, key=scores.get)
        why = "pass cost relative to the first: " + ", ".join(f"{n} {v:.2f}" for n, v in scores.items())
    busy = next((g.meta["busy"] for g in grids.values() if g.meta.get("busy")), None)
    if busy:
        log.warning("auto: %s was chosen on a busy machine (%s): for this run only, measured again next time",
                    name, busy)
    else:
        doc = known_choices()
        doc[key] = {"engine": name, "why": why, "measured": time.time()}
        write_json(choice_cache(), doc)
    target = loaded[name]
    target.choice = f"auto: {name} ran ({why}{'; busy machine, not cached' if busy else ''})"
    return target
