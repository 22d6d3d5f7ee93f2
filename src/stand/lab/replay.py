"""Drafters compared on the same texts: each drafter replays fixed sampled traces, and every step scores the
tokens the real verifier would accept from its tree on average (exactly, not by one draw).

Why: at T > 0 every run of `stand bench` samples its own texts, and A depends on the text (a trace that loops is
drafted well, one that ends early leaves the table cold), so two drafter variants differ by more between runs than
between themselves unless hundreds of samples are drawn. Here the texts are drawn once, by plain decoding; each
variant then decodes them again with its drafter proposing a tree at every step, the target verifying it in the
same pass as the engine runs, and the row committing the trace's own next tokens (the tree's nodes along the trace,
then the trace's next token: an outcome the verifier could have drawn). What a step scores is 1 + the expected
number of accepted nodes under recursive rejection sampling (core/verify.py), computed from the target's
distributions at every node, so neither the text nor the verifier's draws add noise (at T=0: the nodes along the
pass's argmax, as greedy verification accepts); the drafter's own random
draws (Gumbel-Top-K) remain. The drafter learns from each step as it would in a run (observe, with the committed
path as the verdict).

    python -m stand.lab.replay --first 112 --problems 12 --variants stand:24,stand:64 --max-new-tokens 768

With --samples N, each question has N traces and --schedules says how a variant's drafter sees them: alone (a
fresh table per trace, as n=1), sequential (one table per question, the traces one after another) or batched (one
table per question, the N traces as one batch): the sharing of one table measured on the same texts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch

from stand.core.sequence import Row
from stand.core.tree import DraftTree
from stand.core.verify import Verdict, _proposal, residual, sampler_probs
from stand.drafters.templates import TreeTemplate
from stand.engine import Engine
from stand.errors import StandError
from stand.params import SamplingParams, SpecConfig


def node_reach(tree: DraftTree, probs: torch.Tensor) -> np.ndarray:
    """[M] chance that each node lies on the accepted path under verify_sample, given the sampler distributions
    probs [M+1, V] at the root and every node: at each node the children are tried in draw order against the running
    residual, child c accepted with chance min(1, p(c) / q(c)) once its elder siblings were rejected."""
    kids = tree.children()
    reach = np.zeros(len(tree) + 1)  # [M+1] root-0 ids
    reach[0] = 1.0
    stack = [0]
    while stack:
        node = stack.pop()
        if not kids[node]:
            continue
        p = probs[node].double().numpy().copy()  # [V] the residual, unnormalised
        left, drawn = reach[node], {}
        for k, c in enumerate(kids[node]):
            tok, q = tree.tokens[c - 1], tree.qs[c - 1]
            ids, qp = _proposal(q, tok, drawn.setdefault(id(q), []))
            drawn[id(q)].append(tok)
            total = p.sum()
            a = min(1.0, p[tok] / total / qp[ids == tok][0])
            reach[c] = left * a
            stack.append(c)
            left *= 1.0 - a
            if left <= 0.0:
                break
            p = residual(p, total, ids, qp, probs[node], [tree.tokens[j - 1] for j in kids[node][: k + 1]])
    return reach[1:]


def one_hot_argmax(probs: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [..., V] all mass on each row's most likely token: what greedy verification accepts against, so
    node_reach on it is 1 along the argmax path and 0 elsewhere."""
    return torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)


def expected_accepted(tree: DraftTree, probs: torch.Tensor) -> float:
    """Expected accepted draft nodes of `tree` under verify_sample: the sum of every node's chance to be accepted."""
    return float(node_reach(tree, probs).sum())


def follow(tree: DraftTree, ahead: list[int]) -> list[int]:
    """The tree's nodes (root-0 ids) along the tokens `ahead`, as far as they match."""
    kids, node, path = tree.children(), 0, []
    for tok in ahead:
        nxt = next((c for c in kids[node] if tree.tokens[c - 1] == tok), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path


class Replay(Engine):
    """An engine whose rows commit their traces' tokens instead of what a draw would pick; each step's expected
    tokens (1 + expected accepted nodes) and nodes drafted are recorded per row."""

    def __init__(self, target, drafter, traces: dict[int, list[int]], reach_by_tag: np.ndarray | None = None):
        super().__init__(target, drafter)
        self.traces = traces  # row uid -> prompt + the generated tokens to replay
        self.scores: dict[int, list[tuple[float, int]]] = {uid: [] for uid in traces}
        self.reach_by_tag = reach_by_tag  # [T] where given, each tagged node's chance of acceptance is added to its tag

    def _verify(self, r: Row, tree: DraftTree, logits: torch.Tensor, learns: bool):
        probs = sampler_probs(logits[: len(tree) + 1], r.params)  # [M+1, V] what the drafter learns from
        reach = node_reach(tree, one_hot_argmax(probs) if r.params.greedy else probs)  # [M]
        self.scores[r.uid].append((1.0 + float(reach.sum()), len(tree)))
        if self.reach_by_tag is not None and len(tree):
            tags = np.asarray(tree.tags, dtype=np.int64)
            ok = (tags >= 0) & (tags < len(self.reach_by_tag))
            np.add.at(self.reach_by_tag, tags[ok], reach[ok])
        trace, at = self.traces[r.uid], len(r.tokens)
        path = follow(tree, trace[at:])[: len(trace) - at - 1]  # the trace's next token always follows the path
        return Verdict(path, trace[at + len(path)]), probs


@dataclass
class Variant:
    method: str  # a bench method, options in brackets: stand[learn_drafts=false]
    nodes: int

    @classmethod
    def parse(cls, text: str) -> "Variant":
        method, _, nodes = text.rpartition(":")
        return cls(method, int(nodes))


SCHEDULES = ("alone", "sequential", "batched")


def sample_traces(target, prompts: list[list[int]], params: SamplingParams, samples: int = 1) -> list[list[int]]:
    """`samples` plain-decoded samples per prompt (question i: seed + i, sample j: index j), question-major: the
    texts every variant replays."""
    from stand.drafters.registry import make_drafter

    engine = Engine(target, make_drafter(SpecConfig(method="none"), target.vocab_size))
    rows = [Row(p, replace(params, seed=params.seed + i), group=i, index=j)
            for i, p in enumerate(prompts) for j in range(samples)]
    return [r.tokens for r in engine.run(rows)]


def load_traces(path: str, count: int) -> list[list[int]]:
    """The first `count` traces of a --traces JSON (a file sampled for more problems: its first ones); StandError
    if it holds fewer or is not a list of token lists."""
    try:
        with open(path) as f:
            traces = [[int(t) for t in trace] for trace in json.load(f)]
    except (OSError, ValueError, TypeError) as e:
        raise StandError(f"cannot read traces from {path}: {e}") from e
    if len(traces) < count:
        raise StandError(f"{path} holds {len(traces)} traces, fewer than the {count} asked for (problems x samples)")
    return traces[:count]


def pair_traces(prompts: list[list[int]], traces: list[list[int]], samples: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, trace) pairs: `samples` consecutive traces a question, in the prompts' order."""
    return list(zip([p for p in prompts for _ in range(samples)], traces))


def replay(target, traces: list[tuple[list[int], list[int]]], variant: Variant, params: SamplingParams,
           progress=None, samples: int = 1, schedule: str = "alone", template: TreeTemplate | None = None,
           reach_by_tag: np.ndarray | None = None) -> dict:
    """Every (prompt, trace) replayed, `samples` consecutive traces per question. alone: a fresh drafter per trace;
    sequential / batched: one drafter per question whose rows share its table, run one after another / together.
    template: the tree a template drafter fills instead of its own; reach_by_tag [len(template)]: each template node's
    chance of acceptance summed over the steps (a calibration's counts without the verifier's draws)."""
    from stand.drafters.registry import make_drafter
    from stand.lab.bench import with_options

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    base, options = with_options(variant.method)
    spec = SpecConfig(method=base, options=options, nodes=variant.nodes, cost_grid="off").validate()
    per_trace, drafted, draft_s = [], 0, 0.0
    for g in range(0, len(traces), samples):
        pairs = traces[g:g + samples]
        rows = [Row(prompt, replace(params, seed=params.seed + g // samples, max_new_tokens=len(trace) - len(prompt)),
                    group=g // samples, index=j) for j, (prompt, trace) in enumerate(pairs)]
        by_uid = {r.uid: trace for r, (_, trace) in zip(rows, pairs)}
        for run in ([[r] for r in rows] if schedule == "alone" else [rows]):
            drafter = make_drafter(spec, target.vocab_size, target)
            if template is not None and reach_by_tag is not None:
                drafter.count_template(template)  # counted as it is (no refill)
            elif template is not None:
                drafter.use_template(template)
            engine = Replay(target, drafter, {r.uid: by_uid[r.uid] for r in run}, reach_by_tag)
            engine.run(run, max_live=1 if schedule == "sequential" else None)
            drafted += sum(r.stats.drafted for r in run)
            draft_s += sum(r.stats.draft_seconds for r in run)
            assert all(r.tokens == engine.traces[r.uid] for r in run), "a replay commits its trace's tokens"
            per_trace += [engine.scores[r.uid] for r in run]
            if progress:
                progress(len(run))
    steps = [s for scores in per_trace for s in scores]
    return {"variant": f"{variant.method}:{variant.nodes}", "schedule": schedule, "steps": len(steps),
            "expected_A": float(np.mean([a for a, _ in steps])), "nodes_per_step": float(np.mean([n for _, n in steps])),
            "empty_steps": float(np.mean([n == 0 for _, n in steps])),  # no table match at the root: nothing drafted
            "draft_ms_per_node": 1000.0 * draft_s / max(drafted, 1),
            "per_trace": [float(np.mean([a for a, _ in s])) if s else None for s in per_trace]}


def print_table(results: list[dict]) -> None:
    """The replay's results as a markdown table."""
    print("| variant | schedule | expected A | nodes/step | steps drafting nothing | steps |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['schedule']} | {r['expected_A']:.3f} | {r['nodes_per_step']:.1f} "
              f"| {r['empty_steps']:.1%} | {r['steps']} |")


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from stand.api import load_target
    from stand.tts.problems import problem_range

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="champ")
    ap.add_argument("--first", type=int, default=112)
    ap.add_argument("--problems", type=int, default=12)
    ap.add_argument("--variants", default="stand:24,stand:64", help="method:nodes, comma-separated ('': only sample the traces)")
    ap.add_argument("--samples", type=int, default=1, help="traces per question")
    ap.add_argument("--schedules", default="alone", help=f"how a drafter sees a question's traces: {', '.join(SCHEDULES)}")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-new-tokens", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--traces", help="JSON of traces to reuse (written there when absent)")
    ap.add_argument("--tree", help="a tree JSON (stand calibrate) that template drafters fill instead of their own")
    ap.add_argument("--json", help="where to write the results")
    args = ap.parse_args(argv)
    schedules = args.schedules.split(",")
    if args.samples < 1 or any(x not in SCHEDULES for x in schedules):  # before the model loads
        ap.error(f"--samples must be >= 1 and --schedules among {', '.join(SCHEDULES)}")
    try:
        template = TreeTemplate.load(args.tree) if args.tree else None  # a bad file fails before the model loads
    except StandError as e:
        ap.error(str(e))
    target = load_target(None, args.backend, args.dtype)
    params = SamplingParams(args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    prompts = [target.encode(p.prompt) for p in problem_range(args.dataset, args.first, args.problems)]
    if args.traces and os.path.exists(args.traces):
        try:
            traces = load_traces(args.traces, len(prompts) * args.samples)
        except StandError as e:
            ap.error(str(e))
    else:
        traces = sample_traces(target, prompts, params, args.samples)
        if args.traces:
            with open(args.traces, "w") as f:
                json.dump(traces, f)
    pairs = pair_traces(prompts, traces, args.samples)
    runs = [(Variant.parse(v), s) for v in filter(None, args.variants.split(",")) for s in schedules]  # '': sample only
    results = []
    with tqdm(total=len(pairs) * len(runs), desc="replay", unit="trace", file=sys.stderr) as bar:
        for v, schedule in runs:
            results.append(replay(target, pairs, v, params, bar.update, args.samples, schedule, template))
            r = results[-1]
            tqdm.write(f"{r['variant']:32s} {schedule:10s} expected A {r['expected_A']:.3f}  nodes/step "
                       f"{r['nodes_per_step']:.1f}  empty {r['empty_steps']:.1%}  steps {r['steps']}", file=sys.stderr)
    tokens = sum(len(t) - len(p) for p, t in pairs)
    print(f"{args.dataset} {args.first + 1}-{args.first + args.problems} x {args.samples} samples, {tokens} tokens "
          f"replayed, T={args.temperature}")
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "tokens": tokens, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
