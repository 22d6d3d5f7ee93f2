"""Tree search beside self-consistency and best-of-N, per drafting method, on the same problems (`stand search-bench`,
benchmarks/run.sh search): accuracy, tokens spent per problem, tokens/s and tokens accepted per verification pass (A).

Every problem runs every strategy under every method in turn (the methods' order rotates from problem to problem, so a
machine's load falls on all alike); each method has its own engine. Self-consistency and best-of-N are two answers
from the same N samples (one run). "single" is one sample per problem: the A a method reaches alone, which its A
inside a search is compared with. Speed ratios are against `none` on the same strategy, in the same run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from stand.api import Target, encode_prompts, make_engine
from stand.core import files
from stand.errors import StandError
from stand.methods import check_method
from stand.params import SamplingParams, SpecConfig
from stand.tts.problems import Problem
from stand.tts.search import SearchConfig
from stand.tts.solve import SolveConfig, Solution, decide, search_one, solve_one, tally

STRATEGIES = ("single", "self-consistency", "best-of-n", "beam", "dvts")
Progress = Callable[[str], None]  # a line saying what runs now


@dataclass
class SearchBenchConfig:
    methods: list[str]
    strategies: list[str]
    n: int = 8
    params: SamplingParams = field(default_factory=lambda: SamplingParams(0.6, max_new_tokens=512, seed=0))
    spec: SpecConfig = field(default_factory=SpecConfig)  # everything but the method
    search: SearchConfig = field(default_factory=SearchConfig)
    schedule: str = "batched"  # self-consistency / best-of-N samples: batched | sequential | auto

    def validate(self) -> "SearchBenchConfig":
        if not self.methods or not self.strategies:
            raise StandError("give at least one method and one strategy")
        for m in self.methods:
            check_method(m)
        for s in self.strategies:
            if s not in STRATEGIES:
                raise StandError(f"strategy must be one of {', '.join(STRATEGIES)}, got {s!r}")
        for s in set(self.strategies) - {"single"}:
            self.solve_config(s).validate()
        self.params.validate()
        self.spec.validate()
        return self

    def solve_config(self, strategy: str) -> SolveConfig:
        if strategy == "single":
            return SolveConfig(1, "self-consistency", "batched")
        return SolveConfig(self.n, strategy, self.schedule, search=self.search)


def runs(strategies: list[str]) -> list[str]:
    """What is run: best-of-N is read off the self-consistency samples when both are asked for."""
    both = "self-consistency" in strategies and "best-of-n" in strategies
    return [s for s in strategies if not (both and s == "best-of-n")]


def bench_search(target: Target, problems: list[Problem], cfg: SearchBenchConfig,
                 progress: Progress | None = None) -> dict[tuple[str, str], list[Solution]]:
    """(strategy, method) -> its Solution per problem. A Ctrl-C keeps the problems every cell finished."""
    engines = {m: make_engine(target, replace(cfg.spec, method=m)) for m in cfg.methods}
    configs = {s: cfg.solve_config(s).with_scorer() for s in set(cfg.strategies)}
    out: dict[tuple[str, str], list[Solution]] = {(s, m): [] for s in cfg.strategies for m in cfg.methods}
    try:
        for i, (problem, ids) in enumerate(zip(problems, encode_prompts(target, [p.prompt for p in problems]))):
            k = i % len(cfg.methods)
            for strategy in runs(cfg.strategies):
                for method in cfg.methods[k:] + cfg.methods[:k]:
                    if progress:
                        progress(f"{i + 1}/{len(problems)} {strategy} {method}")
                    sol = run_one(engines[method], problem, ids, i, cfg.params, configs[strategy])
                    out[(strategy, method)].append(sol)
                    if strategy == "self-consistency" and "best-of-n" in configs:
                        out[("best-of-n", method)].append(redecide(problem, sol, configs["best-of-n"]))
    except KeyboardInterrupt:
        done = min(len(sols) for sols in out.values())
        return {key: sols[:done] for key, sols in out.items()}
    return out


def run_one(engine, problem: Problem, ids: list[int], group: int, params: SamplingParams,
            config: SolveConfig) -> Solution:
    if config.searches:
        return search_one(engine, problem, ids, group, params, config)
    return solve_one(engine, problem, ids, group, params, config)


def redecide(problem: Problem, sol: Solution, config: SolveConfig) -> Solution:
    """The same samples, answered by another rule."""
    for s in sol.samples:
        s.score = float(config.scorer(problem.prompt, s))
    return decide(problem, sol.samples, config, sol.schedule, sol.seconds, sol.passes)


def records(results: dict[tuple[str, str], list[Solution]]) -> list[dict]:
    """Every problem's figures per (strategy, method), as the JSON keeps them (and `merge` reads them back)."""
    return [{"strategy": s, "method": m, "id": sol.id, "answer": sol.answer, "correct": sol.correct,
             "judged": sol.reference is not None, "tokens": sol.new_tokens, "seconds": sol.seconds,
             "passes": sol.passes, "rounds": None if sol.rounds is None else len(sol.rounds)}
            for (s, m), sols in results.items() for sol in sols]


def summary(per_problem: list[dict]) -> list[dict]:
    """A row per (strategy, method), in first-seen order: accuracy, tokens per problem, seconds, tok/s, A, and the
    ratios: time against `none` on the same strategy, A against the same method's single sample. A record without
    "judged" (files written before it was kept) counts as judged: every dataset the bench takes has references."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in per_problem:
        groups.setdefault((r["strategy"], r["method"]), []).append(r)
    rows = []
    for (strategy, method), recs in groups.items():
        toks, secs, passes = (sum(r[a] for r in recs) for a in ("tokens", "seconds", "passes"))
        acc = tally([(r.get("judged", True), r["correct"], r["answer"]) for r in recs])
        rows.append({"strategy": strategy, "method": method, "problems": len(recs),
                     "accuracy": acc["accuracy"], "correct": acc["correct"], "no_answer": acc["no_answer"],
                     "tokens_per_problem": toks / max(len(recs), 1), "seconds": secs,
                     "tok_per_s": toks / secs if secs > 0 else 0.0, "A": toks / max(passes, 1)})
    by = {(r["strategy"], r["method"]): r for r in rows}
    for r in rows:
        base, alone = by.get((r["strategy"], "none")), by.get(("single", r["method"]))
        r["time_vs_none"] = r["seconds"] / base["seconds"] if base and base["seconds"] > 0 else None
        r["A_vs_single"] = r["A"] / alone["A"] if alone else None
    return rows


def table(rows: list[dict]) -> str:
    """The summary as aligned text."""
    head = ["strategy", "method", "accuracy", "tokens/problem", "tok/s", "A", "time vs none", "A vs single"]
    lines = [head]
    for r in rows:
        lines.append([r["strategy"], r["method"], f"{r['correct']}/{r['problems']}", f"{r['tokens_per_problem']:.0f}",
                      f"{r['tok_per_s']:.1f}", f"{r['A']:.2f}", _ratio(r["time_vs_none"]), _ratio(r["A_vs_single"])])
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in lines)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def as_json(results: dict[tuple[str, str], list[Solution]], cfg: SearchBenchConfig, machine: dict) -> dict:
    """Config, machine, the summary rows and every problem's figures per (strategy, method)."""
    per_problem = records(results)
    config = {"methods": cfg.methods, "strategies": cfg.strategies, "n": cfg.n, "params": asdict(cfg.params),
              "spec": asdict(cfg.spec), "schedule": cfg.schedule,
              "search": {k: v for k, v in asdict(cfg.search).items() if k != "is_final"}}
    return {"config": config, "machine": machine, "summary": summary(per_problem), "problems": per_problem,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S")}


def merge(paths: list[str]) -> dict:
    """Runs of the same configuration on different problems (e.g. problems 1-24, then 25-40) as one: their
    per-problem figures together, the summary computed again. Each time ratio then sums both runs' seconds, so
    each run must have timed `none` and the method on its own problems, as every run does."""
    runs = [files.read_json(p, "search-bench results") for p in paths]
    if not all(isinstance(r, dict) and {"config", "problems"} <= r.keys() for r in runs):
        raise StandError("each file must be a `stand search-bench --json` file")
    first = runs[0]["config"]
    for path, r in zip(paths[1:], runs[1:]):
        if r["config"] != first:
            raise StandError(f"{path} was run with another configuration than {paths[0]}")
    per_problem = [rec for r in runs for rec in r["problems"]]
    seen = [(rec["strategy"], rec["method"], rec["id"]) for rec in per_problem]
    if len(set(seen)) != len(seen):
        raise StandError("the files share a problem: merge runs over different problems")
    return {"config": first, "machines": [r.get("machine") for r in runs], "summary": summary(per_problem),
            "problems": per_problem, "merged_from": paths}


def main(argv: list[str] | None = None) -> None:
    """python -m stand.lab.search_bench A.json B.json [--json OUT]: the runs merged, as a table."""
    import argparse

    ap = argparse.ArgumentParser(description=merge.__doc__)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--json", default=None, help="write the merged runs here")
    args = ap.parse_args(argv)
    try:
        merged = merge(args.paths)
    except StandError as e:
        raise SystemExit(f"error: {e}")
    if args.json:
        files.write_json(args.json, merged, indent=2)
    print(table(merged["summary"]))


if __name__ == "__main__":
    main()
