"""Tree calibration: which nodes of a large template the target actually accepts, kept to the size this machine rewards.

1. Decode calibration prompts with STAND drafting over a large template (about 600 nodes, depth
   >= 16; `templates.large_template`) and count, for every template node, how often it lies on
   the accepted path.
2. A child is accepted only when its parent is, so counts never increase from parent to child and
   the M most-counted nodes (ties to the lower node id, i.e. the parent) form a connected tree.
   Pruning a node never changes the acceptance of the nodes kept (earlier siblings are drawn and
   tested first), so the expected tokens per step of the top-M tree is 1 + sum(kept counts)/steps.
3. Step cost(M) = verify cost of M+1 tokens (the one-row curve of the cost grid, measured here or
   given) plus drafting time per node times M. M maximises expected tokens per second.
4. The tree keeps its counts and the cost grid, so the engine can cut it to fewer nodes per row when
   a batch makes wide passes dear (core/sizing.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from stand.backends.probe import GridConfig
from stand.backends.protocol import pads
from stand.core.cost import CostGrid, interpolate
from stand.core.sizing import acceptance_curve
from stand.backends.machine import measure_here
from stand.errors import StandError
from stand.drafters.templates import TreeTemplate, large_template, most_valuable


@dataclass
class CalibrateConfig:
    dataset: str = "champ"
    problems: int = 4
    first_problem: int = 0  # problems [first, first + problems) of the dataset
    n: int = 1  # samples per problem (sharing one table)
    schedule: str = "sequential"  # for n > 1: the samples one after another (each drafts from a table the earlier
    # ones warmed, as batched samples soon do) or "batched" (n rows of the large template in every pass)
    temperature: float = 0.6
    max_new_tokens: int = 1024  # as long as the traces users generate (the default model ends most within 300-700)
    template_size: int = 600
    max_m: int = 160  # largest tree considered
    keep: int = 80  # nodes the tree file keeps with their counts (>= M): the tree drafted without a cost grid
    seed: int = 0
    cost_curve: str | None = None  # cost grid (`stand profile --grid`) or curve (`--json`) JSON; None = measure here
    reps: int = 3  # forwards per size when measuring the cost grid
    parts: list = field(default_factory=list)  # the configs of the runs whose counts were added up (recount)
    method: str = "stand"  # the STAND variant whose drafts are counted, options in brackets: stand[recency=1]
    traces: str | None = None  # replay these fixed texts (a `python -m stand.lab.replay --traces` JSON, n a problem)
    # and count every node's exact chance of acceptance instead of one decoding's accepted paths
    tree: str | None = None  # a second stage: count this tree's nodes (a first calibration's kept tree) on other
    # problems instead of a large template's, so the counts that rank the kept nodes are not the ones that chose them

    def validate(self) -> "CalibrateConfig":
        """Checks what can be checked before a model is loaded (the problems' range, the sizes)."""
        from stand.tts.problems import problem_range

        for name in ("max_m", "keep", "template_size", "n", "max_new_tokens", "reps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StandError(f"{name} must be an integer >= 1, got {value!r}")
        problem_range(self.dataset, self.first_problem, self.problems)
        if self.tree:
            TreeTemplate.load(self.tree)  # a path that is not a tree file fails before the model loads
        base, _ = self.spec_options()
        if base != "stand":
            raise StandError(f"calibration counts the nodes of a STAND tree: --method must be stand[...], got {self.method!r}")
        if self.traces and not os.path.isfile(self.traces):
            raise StandError(f"--traces {self.traces}: no such file (write one with python -m stand.lab.replay --traces)")
        return self

    def spec_options(self) -> tuple[str, dict]:
        from stand.lab.bench import with_options

        return with_options(self.method)


@dataclass
class Calibration:
    """What calibration found: counts per template node, and the chosen tree."""

    template: TreeTemplate  # the large template
    hits: np.ndarray  # [len(template)] accepted-path count per node
    steps: int
    draft_ms_per_node: float
    cost_ms: dict[int, float]  # verify ms by tree size (root included)
    m: int = 0
    tree: TreeTemplate | None = None
    curve: dict[str, list[float]] = field(default_factory=dict)  # per M: accepted tokens, tokens/s
    grid: CostGrid | None = None  # ms per pass by rows and tokens per row (stored with the tree for the engine)


def top_m(template: TreeTemplate, hits: np.ndarray, m: int) -> tuple[TreeTemplate, list[int]]:
    """The m most-counted nodes as a template (connected), and the large-template id of each node."""
    if not 1 <= m <= len(template):
        raise StandError(f"tree size M must be in 1..{len(template)}, got {m}")
    keep = set(most_valuable(hits, m).tolist())
    if any(template.parents[j] >= 0 and template.parents[j] not in keep for j in keep):
        raise StandError("calibration counts increase from a parent to a child; they cannot come from accepted paths")
    return template.subset(keep)


def expected_accepted(hits: np.ndarray, steps: int, max_m: int) -> np.ndarray:
    """[max_m + 1] expected tokens per step of the top-M tree, M = 0..max_m (the bonus token included)."""
    return acceptance_curve(np.asarray(hits, dtype=np.float64) / max(steps, 1))[: max_m + 1]


def choose_m(hits: np.ndarray, steps: int, cost_ms: dict[int, float], draft_ms_per_node: float,
             max_m: int) -> tuple[int, dict[str, list[float]]]:
    """The M with the most expected tokens per second, and the curves over M = 1..max_m."""
    max_m = min(max_m, len(hits))
    acc = expected_accepted(hits, steps, max_m)[1:]  # [max_m], M = 1..max_m
    ms = np.array([interpolate(cost_ms, m + 1) + draft_ms_per_node * m for m in range(1, max_m + 1)])
    tps = 1000.0 * acc / ms
    best = int(np.argmax(tps)) + 1
    return best, {"m": list(range(1, max_m + 1)), "accepted": acc.tolist(), "step_ms": ms.tolist(),
                  "tokens_per_s": tps.tolist()}


def count_hits(target, prompts: list[list[int]], template: TreeTemplate, cfg: CalibrateConfig,
               progress=None) -> tuple[np.ndarray, int, float]:
    """Decodes the prompts with the large template (n samples each, sharing a table): (hits per node, steps,
    drafting ms per node per step). progress(k): k more tokens were committed."""
    from stand.drafters.stand import StandDrafter
    from stand.core.sequence import Row
    from stand.engine import Engine
    from stand.params import SamplingParams, SpecConfig

    base, options = cfg.spec_options()
    drafter = StandDrafter(SpecConfig(method=base, options=options).validate(), target.vocab_size)
    drafter.count_template(template)
    engine = Engine(target, drafter)
    steps, draft_s, drafted = 0, 0.0, 0
    on_commit = None if progress is None else (lambda row, new: progress(len(new)))
    for i, prompt in enumerate(prompts):
        params = SamplingParams(cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + i)
        rows = [Row(prompt, params, group=i, index=j) for j in range(cfg.n)]
        engine.run(rows, on_commit, max_live=cfg.n if cfg.schedule == "batched" else 1)
        steps += sum(r.stats.steps for r in rows)
        draft_s += sum(r.stats.draft_seconds for r in rows)
        drafted += sum(r.stats.drafted for r in rows)
        if progress:
            progress(sum(cfg.max_new_tokens - r.stats.new_tokens for r in rows))  # a sample that ended early
    return drafter.hits.copy(), steps, 1000.0 * draft_s / max(drafted, 1)


def replay_counts(target, prompts: list[list[int]], template: TreeTemplate, cfg: CalibrateConfig,
                  progress=None) -> tuple[np.ndarray, int, float]:
    """Replays cfg.traces (n a problem, sharing a table as cfg.schedule says) with the large template: (each node's
    summed chance of acceptance, steps, drafting ms per node). Exact expectations on fixed texts: the counts carry
    neither the verifier's draws nor the text's (lab/replay.py), so two variants are counted on the same texts."""
    from stand.lab.replay import Variant, load_traces, pair_traces, replay
    from stand.params import SamplingParams

    pairs = pair_traces(prompts, load_traces(cfg.traces, len(prompts) * cfg.n), cfg.n)
    reach = np.zeros(len(template))
    params = SamplingParams(cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    tick = None if progress is None else (lambda k: progress(k * cfg.max_new_tokens))
    out = replay(target, pairs, Variant(cfg.method, len(template)), params, tick, cfg.n,
                 "alone" if cfg.n == 1 else cfg.schedule, template, reach)
    return reach, out["steps"], out["draft_ms_per_node"]


def calibrate(target, prompts: list[list[int]], cfg: CalibrateConfig, progress=None,
              grid: CostGrid | None = None) -> Calibration:
    """grid: what a pass costs here (default: cfg.cost_curve, else measured now); its one-row curve, read as the
    engine runs passes on this backend (padded where it pads), picks M."""
    template = TreeTemplate.load(cfg.tree) if cfg.tree else large_template(cfg.template_size)
    if grid is None:
        grid = CostGrid.load(cfg.cost_curve) if cfg.cost_curve else measure_here(target, GridConfig(reps=cfg.reps))
    grid = grid.with_padding(pads(target))
    count = replay_counts if cfg.traces else count_hits
    hits, steps, draft_node_ms = count(target, prompts, template, cfg, progress)
    return from_counts(template, hits, steps, draft_node_ms, grid, cfg)


def from_counts(template: TreeTemplate, hits: np.ndarray, steps: int, draft_node_ms: float, grid: CostGrid,
                cfg: CalibrateConfig) -> Calibration:
    """M and the kept tree from accepted-path counts and a cost grid (its one-row curve, read non-decreasing)."""
    if 1 not in grid.ms:
        raise StandError("the cost grid has no one-row curve, which calibration needs")
    cost_ms = {t: grid(1, t) for t in grid.ms[1]}
    m, curve = choose_m(hits, steps, cost_ms, draft_node_ms, cfg.max_m)
    tree, _ = top_m(template, hits, min(max(m, cfg.keep), len(template)))
    return Calibration(template, hits, steps, draft_node_ms, cost_ms, m, tree, curve, grid)


def stored_counts(path: str) -> tuple[np.ndarray, int, float, CalibrateConfig]:
    """(counts per large-template node, steps, drafting ms per node, config) that a calibrated tree file keeps."""
    meta = TreeTemplate.load(path).meta
    hits, cfg = meta.get("template_hits"), meta.get("config")
    if not isinstance(hits, list) or not isinstance(cfg, dict) or not meta.get("steps"):
        raise StandError(f"{path} holds no calibration counts (template_hits, steps, config)")
    cfg = CalibrateConfig(**{k: v for k, v in cfg.items() if k in CalibrateConfig.__dataclass_fields__})
    if cfg.tree:
        raise StandError(f"{path} counts the nodes of {cfg.tree} (a second stage), not a large template's: "
                         "calibrate again with --tree to count them anew")
    if len(hits) != len(large_template(cfg.template_size)):
        raise StandError(f"{path} counts {len(hits)} template nodes; the large template has {cfg.template_size}")
    return np.asarray(hits), int(meta["steps"]), float(meta.get("draft_ms_per_node", 0.0)), cfg


def recount(paths: list[str], grid: CostGrid) -> tuple[Calibration, CalibrateConfig]:
    """Chooses M again from the counts calibrated tree files store (no decoding): e.g. for another machine's grid,
    or the counts of several runs over the same large template (other problems) added up."""
    parts = [stored_counts(p) for p in paths]
    cfg = parts[0][3]
    if any(c.template_size != cfg.template_size for *_, c in parts):
        raise StandError(f"{', '.join(paths)} count different large templates; they cannot be added up")
    if len(parts) > 1:
        cfg = replace(cfg, problems=sum(c.problems for *_, c in parts), parts=[asdict(c) for *_, c in parts])
    steps = sum(s for _, s, _, _ in parts)
    draft_ms = sum(ms * s for _, s, ms, _ in parts) / steps
    hits = np.sum([h for h, *_ in parts], axis=0)
    return from_counts(large_template(cfg.template_size), hits, steps, draft_ms, grid, cfg), cfg


def provenance(cal: Calibration, target, cfg: CalibrateConfig) -> dict:
    i = cal.m - 1
    return {"kind": "calibrated", "model": target.name, "vocab_size": int(target.vocab_size),
            "dtype": str(target.dtype).replace("torch.", ""), "config": asdict(cfg), "steps": cal.steps,
            "m": cal.m, "expected_accepted": cal.curve["accepted"][i],
            "expected_tokens_per_s": cal.curve["tokens_per_s"][i], "draft_ms_per_node": cal.draft_ms_per_node,
            "cost_ms": {str(k): v for k, v in sorted(cal.cost_ms.items())},
            "cost_grid": cal.grid.to_dict() if cal.grid is not None else None,
            "large_template": {"size": len(cal.template), "depth": cal.template.depth,
                               "prior": list(cal.template.meta.get("prior") or [])},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def save(cal: Calibration, target, cfg: CalibrateConfig, out: str, plot: str | None = None) -> dict:
    """Writes the tree JSON (with provenance and kept counts) and, if asked, the PNG of accepted tokens and tok/s over M."""
    meta = provenance(cal, target, cfg)
    _, old_ids = top_m(cal.template, cal.hits, len(cal.tree))
    meta["hits"] = [_count(cal.hits[j]) for j in old_ids]  # count of every node of the tree, in its order
    if cfg.tree:  # the first stage's large-template counts stay: a budget beyond the tree grows from them
        first = cal.template.meta
        meta.update({k: first[k] for k in ("template_hits", "large_template") if k in first})
        meta["first_stage"] = {"tree": cfg.tree, "steps": first.get("steps"), "config": first.get("config")}
    else:
        meta["template_hits"] = [_count(h) for h in cal.hits]  # every node of the large template: M can be chosen again later
    cal.tree.to_json(out, meta)
    if plot:
        save_plot(cal, plot)
    return meta


def _count(h) -> int | float:
    """A node's count as JSON keeps it: accepted paths are whole, a replay's summed chances are not."""
    return int(h) if float(h).is_integer() else round(float(h), 4)


def save_plot(cal: Calibration, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cal.curve
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(c["m"], c["accepted"], color="tab:blue")
    ax.set_xlabel("tree size M (nodes)")
    ax.set_ylabel("expected tokens per step", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(c["m"], c["tokens_per_s"], color="tab:red")
    ax2.set_ylabel("expected tokens per second", color="tab:red")
    ax.axvline(cal.m, color="gray", linestyle="--")
    ax.set_title(f"calibration: M = {cal.m}, {cal.steps} steps")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibration_prompts(target, cfg: CalibrateConfig) -> list[list[int]]:
    """Token ids of dataset problems [first_problem, first_problem + problems)."""
    from stand.tts.problems import problem_range

    return [target.encode(p.prompt) for p in problem_range(cfg.dataset, cfg.first_problem, cfg.problems)]
