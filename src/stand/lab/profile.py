"""The cost curve: milliseconds per forward by number of new tokens and by batch size, ours beside Hugging Face.

One row over a cache of `cache_len` tokens, a tree of T new tokens (a binary tree: every node sees
only its ancestors, as in verification); and B rows of one new token each. The two backends run
interleaved (one forward of each, in turn) so that load on a shared machine hits both alike; the
figure is the median over `reps` forwards. The drafters and the tree calibration read this curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stand.backends.protocol import Backend
from stand.backends.probe import GridConfig, Probe, ProfileConfig, interleaved, measure_grid  # noqa: F401  (lab API)
from stand.backends.machine import measure_here
from stand.lab.hf_anchors import has_hf_forward

@dataclass
class Curve:
    """ms per forward: by new tokens (one row) and by batch size (one token per row)."""

    tokens: dict[str, float] = field(default_factory=dict)
    batch: dict[str, float] = field(default_factory=dict)


@torch.inference_mode()
def cost_curves(targets: dict[str, Backend], cfg: ProfileConfig = ProfileConfig(), progress=None) -> dict[str, Curve]:
    """Curves of every target (e.g. {"ours": lean, "hf": hf}), measured side by side."""
    curves = {name: Curve() for name in targets}
    single = {name: Probe(t, 1, cfg.cache_len) for name, t in targets.items()}
    for n in cfg.tokens:
        for name, ms in interleaved(single, n, cfg).items():
            curves[name].tokens[str(n)] = ms
        if progress:
            progress(f"{n} tokens")
    for rows in cfg.batches:
        probes = {name: Probe(t, rows, cfg.cache_len) for name, t in targets.items()}
        for name, ms in interleaved(probes, 1, cfg).items():
            curves[name].batch[str(rows)] = ms
        if progress:
            progress(f"{rows} rows")
    return curves


def as_json(curves: dict[str, Curve]) -> dict:
    """{"ours": {"1": ms, ...}, "hf": {...}, "batch_ours": {...}, "batch_hf": {...}}."""
    out = {}
    for name, c in curves.items():
        out[name] = c.tokens
        out[f"batch_{name}"] = c.batch
    return out


def table_lines(curves: dict[str, Curve]) -> list[str]:
    """A plain-text table: one line per size, a column per backend, and ours / hf."""
    names = list(curves)
    head = f"{'forward':>14} " + " ".join(f"{n:>9}" for n in names)
    ratio = len(names) == 2
    lines = [head + ("   ratio" if ratio else "")]
    first = curves[names[0]]
    for label, key, kind in [(f"{k} tokens", k, "tokens") for k in first.tokens] + \
                            [(f"{k} rows x 1", k, "batch") for k in first.batch]:
        vals = [getattr(curves[n], kind)[key] for n in names]
        line = f"{label:>14} " + " ".join(f"{v:9.1f}" for v in vals)
        lines.append(line + (f"  {vals[0] / vals[1]:6.2f}" if ratio else ""))
    return lines


def ours(target: Backend) -> Backend:
    """The forward stand decodes with: on torch the lean one where the model supports it; else the backend."""
    if target.kind != "torch":
        return target
    from stand.backends.lean import with_forward

    return with_forward(target, "auto")


def profile_targets(target: Backend) -> dict[str, Backend]:
    """On torch (target loaded with forward="hf"): ours beside the Hugging Face forward of the same weights;
    int4 or another backend: ours alone."""
    return {"ours": ours(target), "hf": target} if has_hf_forward(target) else {"ours": ours(target)}


def remeasure(target: Backend, reps: int, path: str, progress=None) -> list[str]:
    """`stand profile --grid PATH`: this machine's grid measured now (and cached, unless the machine was busy),
    written to PATH; returns its lines of text."""
    grid = measure_here(target, GridConfig(reps=reps), progress)
    grid.save(path)
    kept = f"busy machine, not cached: {grid.meta['busy']}" if grid.meta.get("busy") else "cached for this machine"
    return [f"ms per forward, rows x tokens per row (wrote {path}; {kept}):"] + [
        f"{rows:>3} rows: " + "  ".join(f"{t}:{ms:.0f}" for t, ms in sorted(curve.items()))
        for rows, curve in sorted(grid.ms.items())]


PRODUCTS = ("int4pack_mm", "int8pack_mm", "linear", "addmm", "aten::mm", "aten::matmul")  # the weights' products
ATTENTION = ("scaled_dot_product", "aten::bmm", "softmax")
SPLIT_SHAPES = ((1, 1), (1, 4), (8, 1))  # (rows, tokens per row)


@torch.inference_mode()
def op_split(target: Backend, rows: int, tokens: int, cache_len: int, reps: int = 5) -> dict[str, float]:
    """Where a pass's time goes (torch only): ms per pass, the matrix products of the weights, attention, and the
    rest (norms, rotary, cache writes, casts, Python), from torch.profiler's per-operator times."""
    from torch.profiler import ProfilerActivity, profile

    probe = Probe(target, rows, cache_len)
    for _ in range(2):
        probe.time_ms(tokens)
    wall = sorted(probe.time_ms(tokens) for _ in range(reps))[reps // 2]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            probe.time_ms(tokens)
    ms = lambda names: sum(e.self_cpu_time_total for e in prof.key_averages()  # noqa: E731
                           if any(n in e.key for n in names)) / reps / 1000
    products, attention = ms(PRODUCTS), ms(ATTENTION)
    return {"pass": wall, "products": products, "attention": attention,
            "rest": max(wall - products - attention, 0.0)}


def split_lines(target: Backend, cache_len: int) -> list[str]:
    """`stand profile`'s op split of ours on torch: one line per shape."""
    if target.kind != "torch":
        return []
    lines = [f"where a pass goes (ms; torch.profiler, cache {cache_len}): pass = matrix products + attention + rest"]
    for rows, tokens in SPLIT_SHAPES:
        s = op_split(target, rows, tokens, cache_len)
        lines.append(f"{rows:>3} rows x {tokens:>2}: {s['pass']:6.1f} = {s['products']:5.1f} + {s['attention']:5.1f} "
                     f"+ {s['rest']:5.1f}")
    return lines
