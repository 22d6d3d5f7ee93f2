"""The decoding loop: prefill, then per step draft, verify, commit, observe.

Rows (different prompts, or the N samples of one prompt) advance together with ragged lengths;
a row that finishes leaves the batch.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .budget import CostGrid, nodes_per_row
from .drafters.base import Drafter
from .kv import prefill_batch, tree_batch
from .models import Target
from .params import SamplingParams
from .tree import DraftTree
from .verify import Verdict, sampler_probs, verify

_uids = itertools.count()


@dataclass
class RowStats:
    new_tokens: int = 0
    steps: int = 0  # verification passes
    seconds: float = 0.0  # from the run's start to this row's end
    draft_seconds: float = 0.0  # in the drafter: propose + observe
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per step

    @property
    def mean_accepted(self) -> float:
        """Tokens per verification pass (1.0 for plain decoding)."""
        return self.new_tokens / max(self.steps, 1)

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "forward_passes": self.steps + 1, "steps": self.steps,
                "mean_accepted": self.mean_accepted, "seconds": self.seconds, "draft_seconds": self.draft_seconds}


@dataclass
class Row:
    prompt: list[int]
    params: SamplingParams
    group: int = 0  # rows of a group share drafter tables
    index: int = 0  # sample index within the group
    uid: int = field(default_factory=lambda: next(_uids))
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    finish_reason: str | None = None  # "stop", "length", "cancelled"
    cancelled: bool = False
    text: str = ""
    stats: RowStats = field(default_factory=RowStats)
    logprobs: list[float] | None = None  # set to [] to record each generated token's log-prob under the model (T=1)

    def __post_init__(self):
        self.tokens = list(self.prompt)
        seed = self.params.seed
        self.rng = np.random.default_rng(None if seed is None else [seed, self.group, self.index])

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


OnCommit = Callable[[Row, list[int]], None]


def token_logprobs(logits: torch.Tensor, nodes: list[int], tokens: list[int]) -> list[float]:
    """logits [T, V] of one row; log-probability at T=1 of tokens[i] after node nodes[i]."""
    lp = torch.log_softmax(logits[nodes[: len(tokens)]].float(), dim=-1)  # [K, V]
    return lp.gather(-1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()


class Engine:
    def __init__(self, target: Target, drafter: Drafter, step_tokens: int | None = None, grid: CostGrid | None = None):
        """step_tokens: most tokens one verification pass may carry over all rows (None: no cap).
        grid: what a pass costs here; with it, a drafter that knows its acceptance curve gets the tree size
        per row that maximises tokens per second for the number of live rows (budget.py)."""
        self.target, self.drafter, self.step_tokens, self.grid = target, drafter, step_tokens, grid
        self._budgets: dict[int, tuple[int | None, float, int | None]] = {}  # rows -> _budget(rows)

    @torch.inference_mode()
    def run(self, rows: list[Row], on_commit: OnCommit | None = None, finish: bool = True) -> list[Row]:
        """Decode every row to its end; returns the rows (their tokens, text and stats filled in).

        finish=False: the drafter is not told that the rows ended (the caller calls drafter.finish later),
        so a group's tables outlive the run (sequential samples of one question drafting from earlier ones).
        """
        t0 = time.perf_counter()
        cache, lengths = self._prefill(rows)
        live = list(rows)
        while live:
            lengths = self._step(live, cache, lengths, on_commit)
            keep = [i for i, r in enumerate(live) if not r.done]
            for r in live:
                if r.done:
                    r.stats.seconds = time.perf_counter() - t0
                    r.text = self._text(r)
                    if finish:
                        self.drafter.finish(r)
            if len(keep) < len(live):
                live, lengths = [live[i] for i in keep], [lengths[i] for i in keep]
                if live:
                    cache.keep_rows(keep, max(lengths))
        return rows

    def _prefill(self, rows: list[Row]):
        """Caches every prompt but its last token (the first step's root); equal prompts run once."""
        uniq: dict[tuple, int] = {}
        which = [uniq.setdefault(tuple(r.prompt[:-1]), len(uniq)) for r in rows]
        prefixes = [list(p) for p in uniq]
        cache = self.target.new_cache()
        lengths = [len(r.prompt) - 1 for r in rows]
        want = self.drafter.wants_prompt_probs
        if max(lengths) > 0:
            logits = self.target.forward(cache, prefill_batch(prefixes), all_logits=want)  # [U, P, V]
            cache.keep_rows(which, max(lengths))
        for r, u, L in zip(rows, which, lengths):
            probs = None
            if want and L > 0:
                probs = sampler_probs(logits[u, : len(prefixes[u])], r.params)
            t = time.perf_counter()
            self.drafter.start(r, probs)
            r.stats.draft_seconds += time.perf_counter() - t
            self._check_room(r)
        return cache, lengths

    def _step(self, live: list[Row], cache, lengths: list[int], on_commit: OnCommit | None) -> list[int]:
        S = max(lengths)
        budget = self._budget(len(live))
        trees = [self._draft(r, budget) for r in live]
        logits = self.target.forward(cache, tree_batch(trees, [r.tokens[-1] for r in live], lengths, S))  # [B, T, V]
        verdicts, probs = [], []
        for b, (r, tree) in enumerate(zip(live, trees)):
            lg = logits[b, : len(tree) + 1]  # [M+1, V]
            p = sampler_probs(lg, r.params) if (not r.params.greedy or self.drafter.wants_probs) else None
            verdicts.append(verify(tree, lg, r.params, r.rng, probs=p))
            probs.append(p)
        lengths = cache.commit([[0] + v.accepted for v in verdicts], lengths, S)
        for b, (r, tree, p, v) in enumerate(zip(live, trees, probs, verdicts)):
            t = time.perf_counter()
            self.drafter.observe(r, tree, p, v)
            r.stats.draft_seconds += time.perf_counter() - t
            new = self._commit(r, v.tokens(tree))
            if r.logprobs is not None:
                r.logprobs += token_logprobs(logits[b], [0] + v.accepted, new)
            if on_commit and new:
                on_commit(r, new)
        return lengths

    def row_budget(self, rows: int) -> int | None:
        """Draft nodes per row in a pass of `rows` rows: by cost (see __init__), else the share of step_tokens
        and at most the drafter's preferred size."""
        return self._budget(rows)[0]

    def _budget(self, rows: int) -> tuple[int | None, float, int | None]:
        """(nodes asked of each row, least worth of a node, hard cap per row) for a pass of `rows` rows.

        The least worth: a node accepted with chance v adds v tokens for the marginal cost of one token; with
        m nodes per row, E = acc[m] tokens per row and c = grid(rows, m + 1) ms, it pays iff v >= dc * E / c.
        """
        if rows not in self._budgets:
            cap = None if self.step_tokens is None else max(self.step_tokens // rows - 1, 0)
            acc = None if self.grid is None else self.drafter.acceptance_curve()
            nodes, floor = cap, 0.0
            if acc is not None:
                nodes = nodes_per_row(acc[: None if cap is None else cap + 1], rows, self.grid)
                c = self.grid(rows, nodes + 1)
                floor = float((self.grid(rows, nodes + 2) - c) * acc[nodes] / c)
            elif self.drafter.default_nodes is not None:
                nodes = self.drafter.default_nodes if cap is None else min(cap, self.drafter.default_nodes)
            self._budgets[rows] = (nodes, floor, cap)
        return self._budgets[rows]

    def _draft(self, r: Row, budget: tuple[int | None, float, int | None]) -> DraftTree:
        """The drafter's tree (asked for `nodes` nodes worth at least `floor`), cut to the row's room (tokens
        left, context left) and its hard share of the pass."""
        nodes, floor, cap = budget
        t = time.perf_counter()
        tree = self.drafter.propose(r, nodes, floor)
        r.stats.draft_seconds += time.perf_counter() - t
        room = min(r.params.max_new_tokens - r.stats.new_tokens, self.target.max_len - len(r.tokens)) - 1
        tree = tree.clip(max(room, 0))
        return tree if cap is None else tree.prefix(cap)

    def _commit(self, r: Row, new: list[int]) -> list[int]:
        """Appends the step's tokens up to the first stop condition; returns those kept."""
        kept = []
        for tok in new:
            r.tokens.append(tok)
            kept.append(tok)
            if tok in self.target.eos_ids and not r.params.ignore_eos:
                r.finish_reason = "stop"
                break
            if len(r.tokens) - r.prompt_len >= r.params.max_new_tokens:
                r.finish_reason = "length"
                break
        if r.params.stop and not r.done and self._stop_at(r) is not None:
            r.finish_reason = "stop"
        r.stats.steps += 1
        r.stats.new_tokens = len(r.tokens) - r.prompt_len
        r.stats.accept_lengths.append(len(kept))
        self._check_room(r)
        if r.cancelled and not r.done:
            r.finish_reason = "cancelled"
        return kept

    def _check_room(self, r: Row) -> None:
        if not r.done and len(r.tokens) >= self.target.max_len:
            r.finish_reason = "length"

    def _stop_at(self, r: Row) -> int | None:
        """Character index of the first stop string in the generated text, or None."""
        text = self.target.decode(r.generated)
        hits = [i for i in (text.find(s) for s in r.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _text(self, r: Row) -> str:
        text = self.target.decode(r.generated)
        cut = self._stop_at(r) if r.params.stop else None
        return text if cut is None else text[:cut]
