"""The benchmark: methods side by side on the same problems, in one process, interleaved.

Every (method, n, schedule) is a *variant*. The loop is repeat -> problem -> variant, and the order of
the variants rotates from one problem to the next, so drift of the machine (another process, thermal
state) hits every variant alike. The Hugging Face anchors (`hf`, `hf-pld`, `hf-batched`) call
`model.generate` on the very model our rows use, so they run in the same dtype.

The anchors need the torch backend. A Ctrl-C ends the loop; the rows then cover the problems that every variant finished (so the
comparison stays fair) and say `interrupted: true`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

from stand.api import Target, check_schedule, generate
from stand.core.sequence import mean_accepted
from stand.errors import StandError
from stand.methods import check_method, engine_of, names
from stand.params import SamplingParams, SpecConfig
from stand.tts.answers import extract_answer, is_correct
from stand.tts.problems import Problem, problem_range
from stand.lab.hf_anchors import has_hf_forward, hf_generate
from stand.lab.llamacpp_anchors import anchor_generate, gguf_file
from stand.lab.vllm_anchors import close_engines, engine_dtype, vllm_run
from stand.tts.vote import majority_vote

HF_METHODS, LLAMACPP_METHODS, VLLM_METHODS = names("hf"), names("llama.cpp"), names("vllm")
MEMORY_EVERY = 16  # sample the drafter's table memory every this many commits

Variant = tuple[str, int, str]  # (method, n, schedule)
Progress = Callable[[str, bool], None]  # (variant label, finished?): called before and after every run


@dataclass
class BenchConfig:
    methods: list[str] = field(default_factory=lambda: ["none", "pld"])
    dataset: str = "champ"
    problems: int = 4
    n: int | list[int] = 1  # several values: a row per (method, n, schedule)
    params: SamplingParams = field(default_factory=lambda: SamplingParams(seed=0))  # repeat r: seed + r
    spec: SpecConfig = field(default_factory=SpecConfig)  # every row's drafter knobs (tree, table, cost); method per row
    schedule: str | list[str] = "batched"  # for n > 1; several: a row per schedule
    repeats: int = 1  # every problem this many times; rows give the median and the spread of tok/s
    warmup: bool = True  # one short untimed run of every variant first (lazy init, kernel packing, disk caches)
    first: int = 0  # problems [first, first + problems) of the dataset
    model: str | None = None  # the model's path (vLLM rows read it as a Hugging Face directory); None: the default

    def __post_init__(self):
        self.ns = [self.n] if isinstance(self.n, int) else list(self.n)
        self.schedules = [self.schedule] if isinstance(self.schedule, str) else list(self.schedule)

    def validate(self) -> "BenchConfig":
        for m in self.methods:
            base, options = with_options(m)
            check_method(base, engine=None)  # ours or another engine's (an anchor)
            if options and engine_of(base) != "stand":
                raise StandError(f"{m}: drafter options are for stand's own methods, not the {engine_of(base)} anchor")
        if not self.methods:
            raise StandError("no methods given")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise StandError(f"repeats must be an integer >= 1, got {self.repeats}")
        if not self.ns or min(self.ns) < 1:
            raise StandError(f"n must be integers >= 1, got {self.ns}")
        if not self.schedules:
            raise StandError("no schedule given")
        for s in self.schedules:
            check_schedule(s)
        self.params.validate()
        problem_range(self.dataset, self.first, self.problems)
        if any(m in VLLM_METHODS for m in self.methods):
            from stand.integrations.vllm.launch import vllm_python

            vllm_python()  # where vLLM is, or how to install it: before any model is loaded
        return self

    def seed(self, repeat: int) -> int:
        return (self.params.seed or 0) + repeat

    def variants(self) -> list[Variant]:
        """(method, n, schedule) of every row; n=1 and Hugging Face methods have one schedule."""
        out = []
        for n in self.ns:
            for m in self.methods:
                one = n == 1 or anchor_schedule(m) is not None
                out += [(m, n, anchor_schedule(m) or s) for s in (self.schedules[:1] if one else self.schedules)]
        return out


@dataclass
class Run:
    """One variant on one problem in one repeat."""

    new_tokens: int = 0
    seconds: float = 0.0
    steps: int = 0  # verification passes summed over the samples (None-like 0 when unknown)
    draft_seconds: float | None = 0.0  # None: not measurable (the Hugging Face anchors)
    table_bytes: int | None = None  # the drafter's peak table memory
    correct: bool | None = None  # majority-voted answer matches the reference; None: no reference
    accepted: Counter = field(default_factory=Counter)  # tokens committed in one step -> how many steps
    drafted: int | None = 0  # draft nodes verified over all steps (None: unknown, the anchors)


def label(v: Variant) -> str:
    m, n, s = v
    return f"{m} n={n}" + (f" {s}" if n > 1 and not anchor_schedule(m) else "")


def anchor_schedule(method: str) -> str | None:
    """An anchor's schedule label: the tool it runs (its own loop decides how samples are scheduled)."""
    engine = engine_of(with_options(method)[0])
    return None if engine == "stand" else engine


def with_options(method: str) -> tuple[str, dict]:
    """A bench method with its drafter's own options, one row: 'stand[recency=1;stochastic=false]' -> ('stand',
    {'recency': 1, 'stochastic': False}). Values read as JSON (true, 0.5, "x"), else as strings."""
    base, bracket, rest = method.partition("[")
    if not bracket:
        return method, {}
    if not rest.endswith("]"):
        raise StandError(f"method {method!r}: options go in brackets, e.g. stand[recency=1;stochastic=false]")
    options = {}
    for item in filter(None, rest[:-1].split(";")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise StandError(f"method {method!r}: {item!r} is not key=value")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value.strip()
    return base, options


# ---------------------------------------------------------------------------------------------
# One run


def _majority_correct(texts: list[str], reference: str | None) -> bool | None:
    if reference is None:
        return None
    return bool(is_correct(majority_vote([extract_answer(t) for t in texts]).answer, reference))


class _Memory:
    """on_commit hook: tallies tokens per step and samples the drafter's table memory now and then."""

    def __init__(self, drafter):
        self.drafter, self.commits, self.peak = drafter, 0, drafter.memory_bytes()
        self.accepted: Counter = Counter()

    def __call__(self, row, new: list[int]) -> None:
        self.accepted[len(new)] += 1
        self.commits += 1
        if self.commits % MEMORY_EVERY == 0:
            self.peak = max(self.peak, self.drafter.memory_bytes())


def run_ours(target: Target, method: str, n: int, schedule: str, problem: Problem, cfg: BenchConfig,
             seed: int) -> Run:
    """stand.generate as a user would call it for one problem (a fresh drafter, built with the target)."""
    from stand.drafters.registry import make_drafter

    t = time.perf_counter()
    base, options = with_options(method)
    spec = replace(cfg.spec, method=base, options={**cfg.spec.options, **options}).validate()
    drafter = make_drafter(spec, target.vocab_size, target)
    hook = _Memory(drafter)
    samples = generate(problem.prompt, target, params=replace(cfg.params, seed=seed), spec=spec, n=n,
                       schedule=schedule, drafter=drafter, on_commit=hook)[0]
    seconds = time.perf_counter() - t
    return Run(sum(s.stats["new_tokens"] for s in samples), seconds, sum(s.stats["steps"] for s in samples),
               sum(s.stats["draft_seconds"] for s in samples), max(hook.peak, drafter.memory_bytes()),
               _majority_correct([s.text for s in samples], problem.answer), hook.accepted,
               sum(s.stats["drafted"] for s in samples))


def run_hf(target: Target, method: str, n: int, problem: Problem, cfg: BenchConfig, seed: int) -> Run:
    t = time.perf_counter()
    ids = target.encode(problem.prompt)
    outs, passes = hf_generate(target, ids, method, n, replace(cfg.params, seed=seed))
    texts = [target.decode(o) for o in outs]  # timed, as our rows' detokenising is
    seconds = time.perf_counter() - t
    return Run(sum(map(len, outs)), seconds, passes, None, None, _majority_correct(texts, problem.answer), drafted=None)


def run_llamacpp(target: Target, method: str, n: int, problem: Problem, cfg: BenchConfig, seed: int) -> Run:
    t = time.perf_counter()
    outs = anchor_generate(target, method, target.encode(problem.prompt), n, replace(cfg.params, seed=seed))
    texts = [target.decode(o) for o in outs]
    seconds = time.perf_counter() - t
    return Run(sum(map(len, outs)), seconds, 0, None, None, _majority_correct(texts, problem.answer), drafted=None)


def run_vllm(target: Target, method: str, n: int, problem: Problem, cfg: BenchConfig, seed: int) -> Run:
    r = vllm_run(cfg.model, target, method, problem.prompt, n, replace(cfg.params, seed=seed))
    return Run(r["new_tokens"], r["seconds"], r["steps"], r["draft_seconds"], None,
               _majority_correct(r["texts"], problem.answer), drafted=None)


def run_variant(target: Target, v: Variant, problem: Problem, cfg: BenchConfig, seed: int) -> Run:
    method, n, schedule = v
    if method in VLLM_METHODS:
        return run_vllm(target, method, n, problem, cfg, seed)
    if method in HF_METHODS:
        return run_hf(target, method, n, problem, cfg, seed)
    if method in LLAMACPP_METHODS:
        return run_llamacpp(target, method, n, problem, cfg, seed)
    return run_ours(target, method, n, schedule, problem, cfg, seed)


# ---------------------------------------------------------------------------------------------
# The loop


def warm_up(target: Target, variants: list[Variant], problem: Problem, cfg: BenchConfig,
            progress: Progress | None = None) -> None:
    """Each variant once on a few tokens, untimed: one-off costs do not land on whoever runs first."""
    short = replace(cfg, problems=1, params=replace(cfg.params, max_new_tokens=min(8, cfg.params.max_new_tokens)),
                    spec=replace(cfg.spec, table_path=None))
    for v in variants:
        if progress:
            progress(f"warm-up {label(v)}", False)
        run_variant(target, v, problem, short, cfg.seed(0))


def rotated(variants: list[Variant], k: int) -> list[Variant]:
    k %= len(variants)
    return variants[k:] + variants[:k]


def bench(target: Target, cfg: BenchConfig, progress: Progress | None = None) -> list[dict]:
    """Every variant on every problem, interleaved; one row per variant (see summarise)."""
    cfg.validate()
    if any(m in HF_METHODS for m in cfg.methods) and not has_hf_forward(target):
        raise StandError(f"the anchors {', '.join(HF_METHODS)} run transformers' forward: they need the torch "
                         f"backend in bfloat16 or float32, not {target.kind} {target.dtype}")
    if any(m in LLAMACPP_METHODS for m in cfg.methods) and gguf_file(target) is None:
        raise StandError(f"the anchors {', '.join(LLAMACPP_METHODS)} need a .gguf model on the llama.cpp backend "
                         "or on torch with --dtype int4")
    problems = problem_range(cfg.dataset, cfg.first, cfg.problems)
    variants = cfg.variants()
    runs: dict[Variant, dict[tuple[int, int], Run]] = {v: {} for v in variants}  # (repeat, problem) -> Run
    interrupted = False
    try:
        if cfg.warmup:
            warm_up(target, variants, problems[0], cfg, progress)
        for r in range(cfg.repeats):
            for i, p in enumerate(problems):
                for v in rotated(variants, r * len(problems) + i):
                    if progress:
                        progress(label(v), False)
                    runs[v][(r, i)] = run_variant(target, v, p, cfg, cfg.seed(r))
                    if progress:
                        progress(label(v), True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        close_engines()
    return summarise(runs, cfg, target, interrupted)


# ---------------------------------------------------------------------------------------------
# Rows


def common_keys(runs: dict[Variant, dict[tuple[int, int], Run]]) -> list[tuple[int, int]]:
    """(repeat, problem) pairs that every variant finished."""
    sets = [set(d) for d in runs.values()]
    return sorted(set.intersection(*sets)) if sets else []


def summarise(runs: dict[Variant, dict[tuple[int, int], Run]], cfg: BenchConfig, target: Target,
              interrupted: bool = False) -> list[dict]:
    """One row per variant over the (repeat, problem) pairs all finished; empty if none did.

    tok_per_s is the median over repeats (each repeat: all its problems' tokens / all their seconds),
    tok_per_s_min / _max the spread. speedup_vs_none divides by the fastest `none` schedule at the same
    n, speedup_vs_hf by `hf`, speedup_vs_llamacpp by `llama.cpp` and speedup_vs_vllm by `vllm` at the same n (all medians).
    """
    keys = common_keys(runs)
    rows = [variant_row(v, [runs[v][k] for k in keys], keys, cfg, target, interrupted) for v in runs] if keys else []
    tps = {(r["method"], r["n"], r["schedule"]): r["tok_per_s"] for r in rows}
    for r in rows:
        none = [t for (m, n, _), t in tps.items() if m == "none" and n == r["n"] and t]
        r["speedup_vs_none"] = round(r["tok_per_s"] / max(none), 3) if none else None
        for key, anchor in (("speedup_vs_hf", "hf"), ("speedup_vs_llamacpp", "llama.cpp"), ("speedup_vs_vllm", "vllm")):
            base = tps.get((anchor, r["n"], anchor_schedule(anchor)))
            r[key] = round(r["tok_per_s"] / base, 3) if base else None
    return rows


def _per_repeat_tps(runs: list[Run], keys: list[tuple[int, int]]) -> list[float]:
    by_repeat: dict[int, list[Run]] = {}
    for run, (rep, _) in zip(runs, keys):
        by_repeat.setdefault(rep, []).append(run)
    return [sum(x.new_tokens for x in rs) / max(sum(x.seconds for x in rs), 1e-9) for rs in by_repeat.values()]


def variant_row(v: Variant, runs: list[Run], keys: list[tuple[int, int]], cfg: BenchConfig, target: Target,
                interrupted: bool) -> dict:
    method, n, schedule = v
    tps = _per_repeat_tps(runs, keys)
    tokens, seconds, steps = (sum(getattr(x, a) for x in runs) for a in ("new_tokens", "seconds", "steps"))
    drafts = [x.draft_seconds for x in runs]
    draft = None if any(d is None for d in drafts) else sum(drafts)
    mems = [x.table_bytes for x in runs if x.table_bytes is not None]
    judged = [x.correct for x in runs if x.correct is not None]
    accepted = sum((x.accepted for x in runs), Counter())
    drafted = None if any(x.drafted is None for x in runs) else sum(x.drafted for x in runs)
    return {
        "method": method, "schedule": schedule, "engine": anchor_schedule(method) or "stand",
        "backend": "vllm" if method in VLLM_METHODS else target.kind,
        "dtype": engine_dtype(target) if method in VLLM_METHODS else str(target.dtype).split(".")[-1],
        "n": n, "temperature": cfg.params.temperature, "top_p": cfg.params.top_p, "top_k": cfg.params.top_k,
        "model": target.name, "dataset": cfg.dataset, "problems": len({p for _, p in keys}), "repeats": len(tps),
        "max_new_tokens": cfg.params.max_new_tokens,
        "new_tokens": tokens, "seconds": round(seconds, 3),
        "tok_per_s": round(statistics.median(tps), 2), "tok_per_s_min": round(min(tps), 2),
        "tok_per_s_max": round(max(tps), 2),
        "speedup_vs_none": None, "speedup_vs_hf": None, "speedup_vs_llamacpp": None, "speedup_vs_vllm": None,  # summarise
        "mean_accepted": round(mean_accepted(tokens, steps), 3) if steps else None,
        "nodes": cfg.spec.nodes,  # asked of every row each step (None: each method's own sizing)
        "nodes_per_step": round(drafted / steps, 2) if steps and drafted is not None else None,
        "draft_seconds": None if draft is None else round(draft, 3),
        "draft_share": None if draft is None or not seconds else round(draft / seconds, 4),
        "table_bytes": max(mems) if mems else None,
        "accuracy": round(sum(judged) / len(judged), 3) if judged else None,
        "accept_counts": [accepted.get(k, 0) for k in range(max(accepted, default=-1) + 1)] or None,
        "interrupted": interrupted,
    }


COLUMNS = ("method", "schedule", "engine", "backend", "dtype", "n", "temperature", "new_tokens", "seconds", "tok_per_s", "tok_per_s_min",
           "tok_per_s_max", "speedup_vs_none", "speedup_vs_hf", "speedup_vs_llamacpp", "speedup_vs_vllm", "mean_accepted", "nodes_per_step", "draft_share", "table_bytes",
           "accuracy")


