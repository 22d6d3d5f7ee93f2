"""The decoding loop: prefill, then per step size -> draft -> verify -> commit -> observe.

Rows (different prompts, or the N samples of one prompt) advance together with ragged lengths;
a row that finishes leaves the batch. The engine speaks to the model only through the backend
protocol (backends/protocol.py) and to drafters only through core/drafter.py.

A failure (an allocation, the backend, a drafter, NaN logits) ends only the rows that cause it: the rows whose
prefill failed are retried a group at a time, and a failed pass runs again over each half of its rows in a cache
rebuilt from their tokens, down to the rows that fail alone; those end with finish_reason "error" (Row.error).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from stand.backends.protocol import Backend, pads
from stand.core.cost import CostGrid
from stand.core.sizing import Sizer
from stand.core.drafter import Drafter, PromptDists
from stand.core.sequence import OnCommit, Row
from stand.core.tree import DraftTree
from stand.core.verify import Verdict, sampler_probs, verify

log = logging.getLogger("stand.engine")


def token_logprobs(logits: torch.Tensor, nodes: list[int], tokens: list[int]) -> list[float]:
    """logits [T, V] of one row; log-probability at T=1 of tokens[i] after node nodes[i]."""
    lp = torch.log_softmax(logits[nodes[: len(tokens)]].float(), dim=-1)  # [K, V]
    return lp.gather(-1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class Parked:
    """An ended row's cached tokens, kept in the backend's cache for rows that continue its text."""

    group: int
    handle: object  # the backend cache's (Cache.park)
    tokens: list[int]  # the tokens its cells hold


class Timer:
    """Adds the seconds spent inside `with` to a row's drafting time."""

    def __init__(self, row: Row):
        self.row = row

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.row.stats.draft_seconds += time.perf_counter() - self.t


class Engine:
    """Continuous batching: rows join the running batch at a step boundary (`add`, then `step`) and leave when
    they end; `run` decodes a list of rows to their ends."""

    def __init__(self, target: Backend, drafter: Drafter, step_tokens: int | None = None, grid: CostGrid | None = None):
        """step_tokens: most tokens one verification pass may carry over all rows (None: no cap).
        grid: what a pass costs here; with it, the sizer (core/sizing.py) gives each row the draft nodes that pay
        for the number of live rows, and on a backend that pads, every pass runs at the cheapest width that holds
        it (the grid is read padded: what a pass costs as run)."""
        self.target, self.drafter = target, drafter
        self.grid = None if grid is None else grid.with_padding(pads(target))
        self.sizer = Sizer(self.grid, drafter.acceptance_curve(), drafter.default_nodes, step_tokens,
                           drafter.config.nodes)
        self.live: list[Row] = []  # rows in the cache, decoding
        self.waiting: list[Row] = []  # added, not admitted yet
        self.retiring: list[Row] = []  # ended; the drafter hears of it once the rows waiting behind them joined
        self.held: dict[int, list[Row]] = {}  # group -> its ended rows, kept in the drafter until release(group)
        self.parked: dict[int, Parked] = {}  # uid of an ended row of a held group -> its cached tokens, kept
        self.cache = None
        self.passes = 0  # verification passes run

    @property
    def busy(self) -> bool:
        return bool(self.live or self.waiting or self.retiring)

    def add(self, rows: list[Row]) -> None:
        """Rows join at the next step (their prompts are prefilled then)."""
        self.waiting += rows

    def hold(self, group: int) -> None:
        """Rows of `group` that end stay in the drafter (its shared table, their text) until release(group): the
        rounds of a tree search run one after another, every round's rows drafting from what all earlier ones wrote."""
        self.held.setdefault(group, [])

    def release(self, group: int) -> None:
        """The drafter hears of the group's held rows ending (and may drop what the group shared); their cached
        tokens are freed."""
        self.forget([uid for uid, p in self.parked.items() if p.group == group])
        self.retiring += self.held.pop(group, [])
        if not self.live and not self.waiting:
            self._retire()

    def forget(self, uids: list[int]) -> None:
        """The cached tokens kept for these ended rows (by uid) are freed: no later row continues them."""
        for uid in uids:
            parked = self.parked.pop(uid, None)
            if parked is not None:
                self.cache.unpark(parked.handle)

    @torch.inference_mode()
    def run(self, rows: list[Row], on_commit: OnCommit | None = None, max_live: int | None = None) -> list[Row]:
        """Decode every row to its end; returns the rows (their tokens, text and stats filled in).
        max_live: most rows decoding at once (1: one after another, later rows drafting from earlier ones).
        RuntimeError, once the others are done, if a row failed (step isolates it; a batch caller wants to know)."""
        self.add(rows)
        while self.busy:
            self.step(on_commit, max_live)
        failed = [r for r in rows if r.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"decoding {len(failed)} of {len(rows)} rows failed: {failed[0].error}")
        return rows

    @torch.inference_mode()
    def step(self, on_commit: OnCommit | None = None, max_live: int | None = None) -> list[Row]:
        """Admits waiting rows, then one pass: size -> draft -> verify -> commit -> observe. Returns the rows
        that ended in it."""
        refused = self._admit(max_live)
        self._retire()
        if not self.live:
            return refused
        try:
            self._pass(self.live, self.cache, on_commit)
            rebuild = False
        except Exception as e:
            self._isolate(self.live, on_commit, e)
            rebuild = True
        ended = [r for r in self.live if r.done]
        for r in ended:
            self._end(r)
        if ended:
            self._park([i for i, r in enumerate(self.live) if r.done and r.group in self.held])
            keep = [i for i, r in enumerate(self.live) if not r.done]
            self.live = [self.live[i] for i in keep]
            if not rebuild:
                self.cache.keep(keep)
        if rebuild:
            self.cache = self._rebuilt(self.live)
        if not self.waiting:
            self._retire()
        return refused + ended

    def _isolate(self, rows: list[Row], on_commit: OnCommit | None, error: Exception) -> None:
        """After a pass over `rows` failed: each half runs it again in a cache rebuilt from its rows' tokens, down
        to the rows that fail alone, which end with the error."""
        if len(rows) == 1:
            log.warning("a row failed alone and ends: %s: %s", type(error).__name__, error)
            rows[0].fail(error)
            return
        for part in (rows[: len(rows) // 2], rows[len(rows) // 2:]):
            part = [r for r in part if not r.done]
            try:
                if part:
                    self._pass(part, self._rebuilt(part), on_commit)
            except Exception as e:
                self._isolate(part, on_commit, e)

    def _rebuilt(self, rows: list[Row]):
        """A new cache holding the rows' tokens but the last (the next pass's root); None for no rows."""
        if not rows:
            return None
        cache = self.target.new_cache()
        cache.prefill([r.tokens[:-1] for r in rows])
        return cache

    def _admit(self, max_live: int | None) -> list[Row]:
        """Waiting rows enter the cache (every prompt but its last token, the first step's root). If that fails,
        the cache is rebuilt and the rows enter a group at a time; returns the rows of the groups that failed
        alone (ended with the error)."""
        room = len(self.waiting) if max_live is None else max(max_live - len(self.live), 0)
        rows, self.waiting = self.waiting[:room], self.waiting[room:]
        try:
            self._enter(rows)
            return []
        except Exception as e:
            self.cache = self._rebuilt(self.live)
            groups: dict[int, list[Row]] = {}
            for r in rows:
                groups.setdefault(r.group, []).append(r)
            if len(groups) == 1:
                return self._refuse(rows, e)
        refused = []
        for group in groups.values():
            try:
                self._enter(group)
            except Exception as e:
                self.cache = self._rebuilt(self.live)
                refused += self._refuse(group, e)
        return refused

    def _refuse(self, rows: list[Row], error: Exception) -> list[Row]:
        log.warning("%d rows failed to enter and end: %s: %s", len(rows), type(error).__name__, error)
        for r in rows:
            r.fail(error)
            self._end(r)
        return rows

    def _enter(self, rows: list[Row]) -> None:
        if not rows:
            return
        if not self.live and not self.parked:
            self.cache = self.target.new_cache()
        k = 0 if self.sizer.idle else min(self.drafter.prompt_topk(), self.target.vocab_size)
        # a resuming row's prompt went through the drafter before: no distributions for it
        dists = [PromptDists.empty(len(r.prompt) - 1, k) if k and not r.resumes else None for r in rows]

        def fill(members: list[int], start: int, logits: torch.Tensor) -> None:  # logits [C, V]
            probs = {}  # rows sharing a prefix mostly share their sampling too
            for b in members:
                if dists[b] is None:
                    continue
                key = repr(rows[b].params)
                if key not in probs:
                    probs[key] = sampler_probs(logits, rows[b].params)  # [C, V]
                dists[b].fill(start, probs[key], rows[b].prompt[start + 1:start + 1 + len(logits)])

        wants = any(d is not None for d in dists)
        reuse = [] if wants or not self.parked else [self._reuse(r) for r in rows]  # copied positions: no logits
        self.cache.prefill([r.prompt[:-1] for r in rows], fill if wants else None, **({"reuse": reuse} if any(reuse) else {}))
        t = time.perf_counter()
        for b, r in enumerate(rows):
            r.started = t
            with Timer(r):
                self.drafter.start(r, dists[b])
            r.check_room(self.target.max_len)
        self.live += rows

    def _retire(self) -> None:
        for r in self.retiring:
            if r.group in self.held:
                self.held[r.group].append(r)
            else:
                self.drafter.finish(r)
        self.sizer.forget({r.group for r in self.retiring} - {r.group for r in self.live + self.waiting} - set(self.held))
        self.retiring = []

    def _pass(self, live: list[Row], cache, on_commit: OnCommit | None) -> None:
        self.passes += 1
        asked, trees = zip(*(self._draft(r, len(live)) for r in live))
        trees = self._fit(list(trees))
        learns = self.sizer.learns(len(live))
        logits = cache.step(trees, [r.tokens[-1] for r in live], self._width(len(live), trees))  # row b: [M_b + 1, V]
        verdicts, probs = zip(*(self._verify(r, t, logits[b], learns) for b, (r, t) in enumerate(zip(live, trees))))
        kept = []  # tokens each row keeps: its verdict's, or fewer where it ended inside them
        for b, (r, tree, p, v) in enumerate(zip(live, trees, probs, verdicts)):
            if learns:
                with Timer(r):
                    self.drafter.observe(r, tree, p, v)
            self.sizer.record(r.group, asked[b], [0] + v.accepted)
            new = r.append(v.tokens(tree), self.target.eos_ids, self.target.max_len, self.target.decode, len(tree))
            kept.append(len(new))
            if r.logprobs is not None:
                r.logprobs += token_logprobs(logits[b], [0] + v.accepted, new)
            if on_commit and new:
                on_commit(r, new)
        cache.commit([[0] + v.accepted[: k - 1] for v, k in zip(verdicts, kept)])  # the last kept token: next root

    def _verify(self, r: Row, tree: DraftTree, logits: torch.Tensor,
                learns: bool) -> tuple[Verdict, torch.Tensor | None]:
        """learns: whether the drafter observes this pass (a greedy row needs probabilities only if it does)."""
        lg = logits[: len(tree) + 1]  # [M+1, V]
        if torch.isnan(lg).any():
            raise FloatingPointError("the model's logits hold NaN")
        p = sampler_probs(lg, r.params) if not r.params.greedy or (self.drafter.wants_probs and learns) else None
        return verify(tree, lg, r.params, r.rng, probs=p), p

    def _park(self, rows: list[int]) -> None:
        """Live rows (indices) that ended keep their cached tokens for rows that continue them (Row.continues). The
        cells hold the row's tokens up to the last but one (the last is never in the cache), or fewer: a row cut
        short inside a pass (end of sequence, its token limit) may hold cells past its tokens, which are not kept."""
        for i in rows:
            r = self.live[i]
            handle, cached = self.cache.park(i)
            self.parked[r.uid] = Parked(r.group, handle, r.tokens[:min(cached, len(r.tokens) - 1)])

    def _reuse(self, r: Row) -> tuple[object, int] | None:
        """(handle, k): the first k tokens of the row's prefill copied from the row it continues (what they share)."""
        parked = self.parked.get(r.continues) if r.continues is not None else None
        if parked is None:
            return None
        k = shared_prefix(parked.tokens, r.prompt[:-1])
        return (parked.handle, k) if k else None

    def _end(self, r: Row) -> None:
        r.stats.seconds = time.perf_counter() - r.started
        r.text = r.final_text(self.target.decode)
        self.retiring.append(r)

    def _draft(self, r: Row, rows: int) -> tuple[int, DraftTree]:
        """The row's tree for a pass of `rows` rows, as the sizer asks (nodes worth at least the floor, the first
        `online` of them where an online curve sizes the drafter), cut to the row's room and its hard share of the
        pass; and the nodes the row was asked for (what an online curve records)."""
        (nodes, floor, cap), online = self.sizer.ask(r.group, rows, self.passes)
        if nodes == 0 or online == 0:
            return 0, DraftTree()  # no draft pays in this pass: plain decoding, and no drafting work
        with Timer(r):
            tree = self.drafter.propose(r, nodes, floor)
        if online is not None:
            tree = tree.prefix(online)
        tree = tree.clip(r.room(self.target.max_len))
        tree = tree if cap is None else tree.prefix(cap)
        return (len(tree) if online is None else online), tree

    def _width(self, rows: int, trees: list[DraftTree]) -> int | None:
        """Tokens per row the pass runs at: the widest tree's (root included) padded to the cheapest width the grid
        knows for `rows` rows (None: no padding). Padding positions are never verified nor committed."""
        if self.grid is None or not self.grid.pads:
            return None
        need = max(len(t) for t in trees) + 1
        width, limit = self.grid.pad_to(rows, need), self.target.max_pass_tokens
        return width if width > need and (limit is None or width * rows <= limit) else None

    def _fit(self, trees: list[DraftTree]) -> list[DraftTree]:
        """Trees cut to what one pass of the backend holds: its sequences (a row, plus one per leaf beyond the
        row's first; parked rows keep theirs) and its tokens, shared equally by the rows."""
        rows, seqs, tokens = len(trees), self.target.max_sequences, self.target.max_pass_tokens
        if seqs is not None:
            trees = [t.max_leaves(max((seqs - len(self.parked) - rows) // rows, 0) + 1) for t in trees]
        if tokens is not None:
            trees = [t.prefix(max(tokens // rows - 1, 0)) for t in trees]
        return trees
