"""STAND: stochastic tree drafts from a logit n-gram table filled with the target's own distributions
(arXiv 2506.04708).

Drafting fills a tree template level by level: every frontier node looks up the longest suffix
of its context (the row's tokens plus the path to it) in the table, and draws its children from
the stored top-k, renormalised (q), without replacement by Gumbel-Top-K on fresh noise. Siblings
share one SparseDist q, in draw order, which is what the recursive rejection verifier needs.
Deterministic mode (option stochastic=False, and greedy rows) takes the top-ranked tokens with q=None.

One table per row group (the N samples of a question), or one for the whole run with
`share_across_prompts`, or a persistent one with `table_path` (checked and loaded when the drafter is
made, before any decoding; saved when the last live row finishes).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from stand.errors import StandError
from stand.drafters.ngram_table import NGramTable, TableMismatch, check_table_path, last_tail, tails_of
from stand.core.sizing import acceptance_curve
from stand.drafters.templates import (DEFAULT_PRIOR, TreeTemplate, check_vocab, fill, heuristic, most_valuable,
                                      shipped_tree_path)
from stand.core.tree import DraftTree, SparseDist
from stand.core.drafter import Drafter, PromptDists

log = logging.getLogger(__name__)
NOISE_BLOCK = 1 << 14
SHARED = "shared"


@dataclass
class StandOptions:
    max_n: int = 4  # longest context suffix the n-gram table keys
    topk: int = 10  # next tokens kept per table entry
    capacity: int = 1 << 18  # table slots (the least recently used are evicted beyond)
    stochastic: bool = True  # Gumbel-Top-K drafts; False: the top-ranked tokens with one-hot q

    def __post_init__(self):
        if self.max_n < 1:
            raise StandError(f"max_n must be >= 1, got {self.max_n}")


@dataclass
class DynamicStandOptions(StandOptions):
    nodes: int = 32  # most draft nodes per row
    floor: float = 0.02  # least estimated acceptance of a node (the pass may ask for more)


class GumbelNoise:
    """A precomputed block of Gumbel(0, 1) noise, refreshed when used up; every draw takes fresh values."""

    def __init__(self, rng: np.random.Generator, block: int = NOISE_BLOCK):
        self.rng, self.block = rng, block
        self._refill()

    def _refill(self) -> None:
        self.buf = -np.log(-np.log(self.rng.random(self.block).clip(1e-300, None)))  # [block]
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        if n > self.block:
            return -np.log(-np.log(self.rng.random(n).clip(1e-300, None)))
        if self.pos + n > self.block:
            self._refill()
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


@dataclass
class RowState:
    table_key: object
    noise: GumbelNoise


@dataclass
class Draw:
    """A node's children drawn from the table: every stored token in draw order [K'], and the q drawn from."""

    tokens: np.ndarray  # [K'] int64
    q: np.ndarray  # [K'] float64, in the table's order
    dist: SparseDist | None  # q as recorded on the drawn nodes (None for deterministic drafts: one-hot q)


def draw(table: NGramTable, tail: tuple, noise: GumbelNoise, deterministic: bool) -> Draw | None:
    """Draws from the table's top-k after the longest stored suffix of tail (None without one): without
    replacement by Gumbel-Top-K on fresh noise, or by rank when deterministic."""
    slot, _ = table.longest(tail)
    if slot < 0:
        return None
    ids, p = table.dist(slot)
    if len(ids) == 0:
        return None
    q = p / p.sum()  # [K'] the distribution sampled from, recorded exactly
    keys = -q if deterministic else -(np.log(q) + noise.take(len(q)))
    return Draw(ids[np.argsort(keys, kind="stable")], q, None if deterministic else SparseDist(ids, q))


def top_dist(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, V] probabilities -> top-k ids [N, k] int64 and probs [N, k] float64."""
    vals, ids = torch.topk(probs.float(), min(k, probs.shape[-1]), dim=-1)
    return ids.numpy().astype(np.int64), vals.double().numpy()


def node_tails(root_tail: np.ndarray, tree: DraftTree) -> np.ndarray:
    """[max_n] tail of the root's context -> [M+1, max_n] context tail of every node (root-0 indexing)."""
    tails = np.empty((len(tree) + 1, len(root_tail)), dtype=np.int64)
    tails[0] = root_tail
    for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents)):
        tails[i + 1, :-1] = tails[p + 1, 1:]
        tails[i + 1, -1] = tok
    return tails


def node_acceptance(template: TreeTemplate) -> np.ndarray:
    """[M] chance that each node lies on the accepted path: calibration counts / steps where the tree has
    them, else the prior's path value (product of the rank priors along the path)."""
    meta = template.meta
    hits, steps = meta.get("hits"), meta.get("steps")
    if isinstance(hits, list) and len(hits) == len(template) and steps:
        return np.asarray(hits, dtype=np.float64) / float(steps)
    prior = list(meta.get("prior") or DEFAULT_PRIOR)
    p = np.zeros(len(template))
    for j, (parent, rank) in enumerate(zip(template.parents, template.ranks)):
        p[j] = (1.0 if parent < 0 else p[parent]) * prior[min(rank, len(prior) - 1)]
    return p


class StandDrafter(Drafter):
    name = "stand"
    Options = StandOptions
    wants_probs = True

    def __init__(self, config, vocab_size: int):
        super().__init__(config, vocab_size)
        self.use_template(self._load_template())
        self.tables: dict[object, NGramTable] = {}
        self.members: dict[object, set[int]] = {}
        self.rows: dict[int, RowState] = {}
        self.peak_bytes = 0
        self.table_error: str | None = None
        if self.config.table_path:  # opened now, so a path that cannot be used fails before any decoding
            self.tables[SHARED] = self._open_persistent()

    # ---- configuration --------------------------------------------------------------------------

    def use_template(self, template: TreeTemplate) -> None:
        self.template = template
        self.kids = template.children()
        self.node_p = node_acceptance(template)  # [M] chance each node lies on the accepted path
        self.default_nodes = min(int(template.meta.get("m") or len(template)), len(template))  # calibration's M
        self._cuts: dict[int, list[list[int]]] = {}
        self.hits = np.zeros(len(template), dtype=np.int64)  # accepted-path count per template node

    def _load_template(self) -> TreeTemplate:
        """--tree (a warning if it was calibrated for another vocabulary), else the shipped calibrated tree
        where this model's vocabulary is the one it was calibrated for, else the heuristic tree."""
        if self.config.tree:
            template = TreeTemplate.load(self.config.tree)
            check_vocab(template, self.vocab_size, self.config.tree)
            return template
        path = shipped_tree_path()
        template = TreeTemplate.load(path) if path else None
        return template if template and template.meta.get("vocab_size") == self.vocab_size else heuristic()

    def prepare(self, target) -> None:
        """Warns when the tree was calibrated on a model of another name (same vocabulary)."""
        want = self.template.meta.get("model")
        if want and self.template.meta.get("vocab_size") in (None, self.vocab_size) and want != target.name:
            log.warning("tree calibrated for %s is used with %s", want, target.name)

    def _new_table(self) -> NGramTable:
        o = self.options
        return NGramTable(o.max_n, o.topk, o.capacity)

    def _open_persistent(self) -> NGramTable:
        """The table at config.table_path, or an empty one where there is none yet (or an empty file).

        StandError (before anything is decoded) for a path that is a directory or a file that is not a stand
        table, and for a table built for another vocabulary or other max_n/topk: replacing those at the end
        would lose them. A damaged stand table is logged and replaced by a fresh one."""
        path = check_table_path(self.config.table_path)
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            return self._new_table()
        o = self.options
        try:
            table, _ = NGramTable.load(path, o.capacity, self.vocab_size)
        except TableMismatch:
            raise
        except StandError as e:
            self.table_error = str(e)
            log.error("%s; continuing with an empty table, saved over it at the end", e)
            return self._new_table()
        if table.max_n != o.max_n or table.topk != o.topk:
            raise TableMismatch(f"n-gram table {path} has max_n={table.max_n}, topk={table.topk}; this run uses "
                                f"max_n={o.max_n}, topk={o.topk}: give another table path or matching options")
        return table

    def save_table(self, path: str | None = None) -> None:
        """Saves the shared table (to config.table_path by default); StandError if it cannot be written."""
        path = path or self.config.table_path
        table = self.tables.get(SHARED)
        if path and table is not None:
            table.save(path, meta={"vocab_size": self.vocab_size, "method": self.name})

    def _key(self, row) -> object:
        return SHARED if (self.config.share_across_prompts or self.config.table_path) else ("group", row.group)

    def table_for(self, row) -> NGramTable:
        return self.tables[self.rows[row.uid].table_key]

    # ---- the drafter interface ------------------------------------------------------------------

    def prompt_topk(self) -> int:
        return self.options.topk

    def start(self, row, prompt: PromptDists | None) -> None:
        key = self._key(row)
        if key not in self.tables:
            self.tables[key] = self._new_table()
        self.members.setdefault(key, set()).add(row.uid)
        seed = int(row.rng.integers(2**63))
        self.rows[row.uid] = RowState(key, GumbelNoise(np.random.default_rng(seed)))
        if prompt is not None and len(prompt):
            tails = tails_of(np.asarray(row.prompt[: len(prompt)]), self.options.max_n)  # [P-1, max_n]
            self.tables[key].insert(tails, prompt.ids, prompt.probs)
        self._track_memory()

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        deterministic = (not self.options.stochastic) or row.params.greedy
        m = self.default_nodes if max_nodes is None else max_nodes
        kids = self.kids if m >= len(self.template) else self._cut(m)
        return self.draft(self.table_for(row), self._root_tail(row), self.rows[row.uid].noise, deterministic, kids)

    def acceptance_curve(self) -> np.ndarray:
        """[M+1] expected tokens per step with the template's m most valuable nodes, m = 0..M."""
        return acceptance_curve(self.node_p)

    def _cut(self, m: int) -> list[list[int]]:
        """Children lists of the template's m most valuable nodes (a connected subtree; ids unchanged)."""
        if m not in self._cuts:
            self._cuts[m] = self.template.children(most_valuable(self.node_p, m))
        return self._cuts[m]

    def observe(self, row, tree: DraftTree, probs: torch.Tensor | None, verdict) -> None:
        if probs is None:
            return
        ids, p = top_dist(probs[: len(tree) + 1], self.options.topk)  # [M+1, k]
        self.table_for(row).insert(node_tails(self._root_tail(row), tree), ids, p)
        for node in verdict.accepted:
            tag = tree.tags[node - 1]
            if 0 <= tag < len(self.hits):
                self.hits[tag] += 1

    def finish(self, row) -> None:
        state = self.rows.pop(row.uid, None)
        if state is None:
            return
        members = self.members.get(state.table_key, set())
        members.discard(row.uid)
        if members:
            return
        self._track_memory()
        if state.table_key == SHARED:
            if self.config.table_path:
                self._save_quietly()
            return
        del self.tables[state.table_key], self.members[state.table_key]

    def _save_quietly(self) -> None:
        """Saves the persistent table; a failure is logged, never raised into the decoding it follows."""
        try:
            self.save_table()
        except StandError as e:
            self.table_error = str(e)
            log.error("%s", e)

    def memory_bytes(self) -> int:
        """The most table memory this drafter held at once (tables are fixed-size arrays)."""
        self._track_memory()
        return self.peak_bytes

    def _track_memory(self) -> None:
        self.peak_bytes = max(self.peak_bytes, sum(t.memory_bytes() for t in self.tables.values()))

    # ---- drafting -------------------------------------------------------------------------------

    def _root_tail(self, row) -> np.ndarray:
        """[max_n] the row's last max_n tokens, left-padded with -1."""
        return last_tail(row.tokens, self.options.max_n)

    def draft(self, table: NGramTable, root_tail: np.ndarray, noise: GumbelNoise, deterministic: bool,
              kids: list[list[int]] | None = None) -> DraftTree:
        """Fills the template (or its cut `kids`) breadth-first; a node without a table match loses its subtree."""

        def children(tail: tuple, n: int) -> list[tuple[int, SparseDist | None, tuple]]:
            d = draw(table, tail, noise, deterministic)
            return [] if d is None else [(t, d.dist, tail[1:] + (t,)) for t in d.tokens[:n].tolist()]

        return fill(self.kids if kids is None else kids, tuple(root_tail.tolist()), children)


class DynamicStandDrafter(StandDrafter):
    """STAND whose tree follows the table's confidence instead of a fixed shape (best-first expansion).

    The slot for the r-th draw at a node is worth v(node) * q_r, where q_r is the r-th largest probability of
    the node's table distribution and v(root) = 1: an estimate of the chance the draw is accepted, known before
    the draw is made. Slots are filled best-first while worth at least the pass's min_value (the engine sets it
    from the cost grid) and the option floor, up to the option nodes (and max_nodes when there is no min_value).
    Lossless: whether a draw is made depends on the path to its node, on earlier draws and on other branches,
    never on the draw itself or later ones (a slot's worth never exceeds its parent's or an earlier sibling's,
    and ties go to the node created first), which is all the recursive rejection verifier needs.
    """

    name = "stand-dynamic"
    Options = DynamicStandOptions

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        deterministic = (not self.options.stochastic) or row.params.greedy
        cap = self.options.nodes  # with a floor from the pass (min_value > 0) the size follows worth
        if max_nodes is not None and min_value == 0.0:
            cap = min(cap, max_nodes)
        return self.draft_best_first(self.table_for(row), self._root_tail(row), self.rows[row.uid].noise,
                                     deterministic, cap, max(min_value, self.options.floor))

    def draft_best_first(self, table: NGramTable, root_tail: np.ndarray, noise: GumbelNoise, deterministic: bool,
                         cap: int, floor: float) -> DraftTree:
        tree = DraftTree()
        heap: list[tuple[float, int, int, int]] = []  # (-worth, tiebreak, node, rank); node -1 = the root
        opened: dict[int, tuple] = {}  # node -> (tokens in draw order, q, sorted probabilities, worth, tail)
        tick = itertools.count()

        def open_node(node: int, tail: tuple, worth: float) -> None:
            d = draw(table, tail, noise, deterministic)
            if d is not None:
                opened[node] = (d.tokens, d.dist, np.sort(d.q)[::-1], worth, tail)
                heapq.heappush(heap, (-worth * opened[node][2][0], next(tick), node, 0))

        open_node(-1, tuple(root_tail.tolist()), 1.0)
        while heap and len(tree) < cap:
            neg, _, node, rank = heapq.heappop(heap)
            if -neg < floor:
                break
            drawn, dist, sorted_q, worth, tail = opened[node]
            idx = tree.add(int(drawn[rank]), node, dist)
            if rank + 1 < len(drawn):
                heapq.heappush(heap, (-worth * sorted_q[rank + 1], next(tick), node, rank + 1))
            open_node(idx, tail[1:] + (int(drawn[rank]),), -neg)
        return tree


class HeuristicStandDrafter(StandDrafter):
    """STAND with the heuristic default tree instead of the calibrated one (an ablation)."""

    name = "stand-heuristic"

    def _load_template(self) -> TreeTemplate:
        return heuristic()
