"""STAND: stochastic tree drafts from a logit n-gram table filled with the target's own distributions
(arXiv 2506.04708).

Drafting fills a tree template level by level: every frontier node looks up the longest suffix
of its context (the row's tokens plus the path to it) in the table, and draws its children from
the stored top-k, renormalised (q), without replacement by Gumbel-Top-K on fresh noise. Siblings
share one SparseDist q, in draw order, which is what the recursive rejection verifier needs.
Deterministic mode (option stochastic=False, and greedy rows) takes the top-ranked tokens with q=None.

Each sample also keeps a small table of its own latest distributions (option own_latest, on by default) and drafts
through both (draws.OwnFirst): its own latest where its match is as long, the question's running mean beyond.

One table per row group (the N samples of a question), or one for the whole run with
`share_across_prompts`, or a persistent one with `table_path` (checked and loaded when the drafter is
made, before any decoding; saved when the last live row finishes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from stand.errors import StandError
from stand.drafters.draws import BestFirst, GumbelNoise, OwnFirst, draw
from stand.drafters.ngram_table import NGramTable, TableMismatch, check_table_path, last_tail, tails_of
from stand.core.sizing import acceptance_curve
from stand.drafters.templates import (DEFAULT_PRIOR, TreeTemplate, check_vocab, fill, grown_tree, heuristic,
                                      most_valuable, shipped_tree_path)
from stand.core.tree import DraftTree, SparseDist
from stand.core.drafter import Drafter, PromptDists

log = logging.getLogger(__name__)
SHARED = "shared"


@dataclass
class StandOptions:
    max_n: int = 6  # longest context suffix the n-gram tables key (6: siblings' contexts told apart; docs/results.md)
    topk: int = 10  # next tokens kept per table entry
    capacity: int = 1 << 18  # table slots (the least recently used are evicted beyond)
    stochastic: bool = True  # Gumbel-Top-K drafts; False: the top-ranked tokens with one-hot q
    recency: float = 0.0  # weight of a new distribution at least this (0: the running mean; 1: the latest only)
    learn_drafts: bool = True  # insert every verified node's distribution; False: the accepted path's only
    prompt: bool = True  # insert the prompt's distributions
    min_n: int = 1  # shortest context suffix a lookup backs off to
    shared: bool = True  # the samples of a question share one table; False: a table per sample (an ablation)
    sharpen: float = 1.0  # draws from q ~ p^sharpen over the stored top-k (1: the stored distribution renormalised)
    refill: bool = True  # nodes the template leaves unfilled (no table match) are drawn best-first where it is surest
    reserve: float = 1 / 3  # with refill: this share of a tree's nodes is left out of the template and grown best-first
    # (deeper than the template where the table is sure, as in a loop)
    own_latest: bool = True  # each sample also keeps its own latest distributions, drafted from where its own
    # context is at least as long as the shared table's (draws.OwnFirst); False: the shared running mean alone
    own_capacity: int = 1 << 13  # slots of a sample's own table (LRU beyond; a long prompt's last keys)

    def __post_init__(self):
        if not 1 <= self.min_n <= self.max_n:
            raise StandError(f"need 1 <= min_n <= max_n, got min_n={self.min_n}, max_n={self.max_n}")
        if not 0.0 <= self.recency <= 1.0:
            raise StandError(f"recency must be in [0, 1], got {self.recency}")
        if not 0.0 <= self.reserve < 1.0:
            raise StandError(f"reserve must be in [0, 1), got {self.reserve}")


@dataclass
class DynamicStandOptions(StandOptions):
    nodes: int = 32  # most draft nodes per row
    floor: float = 0.02  # least estimated acceptance of a node (the pass may ask for more)


@dataclass
class RowState:
    table_key: object
    noise: GumbelNoise
    own: NGramTable | None = None  # the sample's own latest distributions (option own_latest)


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
        self.prompts: dict[object, set[int]] = {}  # table key -> hashes of the prompts inserted into it
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
        self._cuts: dict[int, list[list[int]]] = {}  # nodes -> children lists of the tree of that many nodes
        self.hits = np.zeros(len(template), dtype=np.int64)  # accepted-path count per template node (calibration)

    def count_template(self, template: TreeTemplate) -> None:
        """Drafts `template` as it is, to count its nodes (calibration): no refill, whose untagged nodes would take
        acceptances from the template's own."""
        self.use_template(template)
        self.options.refill = False

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
        return NGramTable(o.max_n, o.topk, o.capacity, o.recency)

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
            table, _ = NGramTable.load(path, o.capacity, self.vocab_size, (o.max_n, o.topk))
        except TableMismatch:
            raise
        except StandError as e:
            self.table_error = str(e)
            log.error("%s; continuing with an empty table, saved over it at the end", e)
            return self._new_table()
        table.recency = o.recency
        return table

    def save_table(self, path: str | None = None) -> None:
        """Saves the shared table (to config.table_path by default); StandError if it cannot be written."""
        path = path or self.config.table_path
        table = self.tables.get(SHARED)
        if path and table is not None:
            table.save(path, meta={"vocab_size": self.vocab_size, "method": self.name})

    def _key(self, row) -> object:
        if self.config.share_across_prompts or self.config.table_path:
            return SHARED
        return ("group", row.group) if self.options.shared else ("row", row.uid)

    def table_for(self, row) -> NGramTable:
        return self.tables[self.rows[row.uid].table_key]

    def lookup_for(self, row) -> NGramTable | OwnFirst:
        """What a row drafts from: its question's table, seen through its own where it keeps one."""
        state = self.rows[row.uid]
        table = self.tables[state.table_key]
        return table if state.own is None else OwnFirst(state.own, table)

    def _tables_of(self, row) -> list[NGramTable]:
        """Every table a row's distributions go into."""
        state = self.rows[row.uid]
        return [self.tables[state.table_key]] + ([state.own] if state.own is not None else [])

    # ---- the drafter interface ------------------------------------------------------------------

    def prompt_topk(self) -> int:
        return self.options.topk

    def start(self, row, prompt: PromptDists | None) -> None:
        key = self._key(row)
        if key not in self.tables:
            self.tables[key] = self._new_table()
        self.members.setdefault(key, set()).add(row.uid)
        seed = int(row.rng.integers(2**63))
        o = self.options
        own = NGramTable(o.max_n, o.topk, o.own_capacity, recency=1.0) if o.own_latest else None
        self.rows[row.uid] = RowState(key, GumbelNoise(np.random.default_rng(seed)), own)
        fresh = hash(tuple(row.prompt)) not in self.prompts.setdefault(key, set())
        if prompt is not None and len(prompt) and o.prompt:
            tails = tails_of(np.asarray(row.prompt[: len(prompt)]), o.max_n)  # [P-1, max_n]
            if fresh:
                # once per table: the samples of a question share its prompt, and N copies of one distribution would
                # only weigh the prompt's entries N times against what the samples write later
                self.prompts[key].add(hash(tuple(row.prompt)))
                self.tables[key].insert(tails, prompt.ids, prompt.probs)
            if own is not None:  # a long prompt's end only (the table keeps a batch's last keys that fit)
                own.insert(tails, prompt.ids, prompt.probs)
        self._track_memory()

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        deterministic = (not self.options.stochastic) or row.params.greedy
        kids = self.kids if max_nodes is None else self._cut(max_nodes)
        cap = sum(map(len, kids))
        if self.options.refill and self.options.reserve > 0:  # the template's part; the rest is grown best-first
            kids = self._cut(max(cap - round(cap * self.options.reserve), 1))
        return self.draft(self.lookup_for(row), self._root_tail(row), self.rows[row.uid].noise, deterministic, kids,
                          min_value, cap)

    def acceptance_curve(self) -> np.ndarray:
        """[M+1] expected tokens per step with the template's m most valuable nodes, m = 0..M."""
        return acceptance_curve(self.node_p)

    def _cut(self, m: int) -> list[list[int]]:
        """Children lists of the template's m most valuable nodes (a connected subtree; ids unchanged); for more
        nodes than the template has (an equal budget), the tree grown to m nodes where it can grow, else the whole
        template."""
        if m not in self._cuts:
            if m < len(self.template):
                self._cuts[m] = self.template.children(most_valuable(self.node_p, m))
            else:
                grown = self.grown(m) if m > len(self.template) else None
                self._cuts[m] = self.kids if grown is None else grown.children()
        return self._cuts[m]

    def grown(self, m: int) -> TreeTemplate | None:
        """A tree of m nodes larger than the template: the m most accepted nodes of the large template the
        calibrated tree was cut from, where its file keeps their counts (None otherwise)."""
        return grown_tree(self.template.meta, m)

    def observe(self, row, tree: DraftTree, probs: torch.Tensor | None, verdict) -> None:
        if probs is None:
            return
        ids, p = top_dist(probs[: len(tree) + 1], self.options.topk)  # [M+1, k]
        tails = node_tails(self._root_tail(row), tree)  # [M+1, max_n]
        if not self.options.learn_drafts:
            path = [0] + list(verdict.accepted)  # the root and the accepted nodes: the sample's own contexts
            ids, p, tails = ids[path], p[path], tails[path]
        for table in self._tables_of(row):
            table.insert(tails, ids, p)
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
        del self.tables[state.table_key], self.members[state.table_key], self.prompts[state.table_key]

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
        own = sum(r.own.memory_bytes() for r in self.rows.values() if r.own is not None)
        self.peak_bytes = max(self.peak_bytes, own + sum(t.memory_bytes() for t in self.tables.values()))

    # ---- drafting -------------------------------------------------------------------------------

    def _root_tail(self, row) -> np.ndarray:
        """[max_n] the row's last max_n tokens, left-padded with -1."""
        return last_tail(row.tokens, self.options.max_n)

    def draft(self, table: NGramTable, root_tail: np.ndarray, noise: GumbelNoise, deterministic: bool,
              kids: list[list[int]] | None = None, floor: float = 0.0, cap: int | None = None) -> DraftTree:
        """Fills the template (or its cut `kids`) breadth-first; a node without a table match loses its subtree. With
        the option refill, the tree is grown best-first (BestFirst) from where the fill stopped to cap nodes (default:
        the template's), spending the nodes lost and those the template was cut short of."""
        kids = self.kids if kids is None else kids
        cap = sum(map(len, kids)) if cap is None else cap
        made: list[list] = []  # [tail, draw there] of every tree node, in the tree's order

        def children(here: list, n: int) -> list[tuple[int, SparseDist | None, list]]:
            here[1] = d = draw(table, here[0], noise, deterministic, self.options.min_n, self.options.sharpen)
            out = [] if d is None else [(t, d.dist, [here[0][1:] + (t,), None]) for t in d.tokens[:n].tolist()]
            made.extend(child for *_, child in out)
            return out

        root = [tuple(root_tail.tolist()), None]
        tree = fill(kids, root, children)
        if not self.options.refill or len(tree) >= cap:
            return tree
        return self._refill(self._grower(table, noise, deterministic, tree), root, made).grow(cap, floor)

    def _grower(self, table: NGramTable, noise: GumbelNoise, deterministic: bool,
                tree: DraftTree | None = None) -> BestFirst:
        """A BestFirst drawing as this drafter's options say (min_n, sharpen), growing tree (default: a new one)."""
        return BestFirst(table, noise, deterministic, self.options.min_n, self.options.sharpen, tree)

    @staticmethod
    def _refill(grower: BestFirst, root: list, made: list[list]) -> BestFirst:
        """Seeds grower with the filled tree: every node's next draw (its children so far are the first ranks of
        the draw made there; a leaf gets its first draw now), worth v(node) = v(parent) * q at the node's rank."""
        tree, kids = grower.tree, grower.tree.children()
        worth = np.ones(len(tree) + 1)  # root-0 indexing
        for node, (tail, d) in enumerate([root] + made):
            if d is not None:
                sorted_q = np.sort(d.q)[::-1]
                for rank, c in enumerate(kids[node]):
                    worth[c] = worth[node] * sorted_q[rank]
            grower.open(node - 1, tail, worth[node], d, len(kids[node]))  # a leaf without d: a new draw, if any
        return grower


class DynamicStandDrafter(StandDrafter):
    """STAND whose tree follows the table's confidence instead of a fixed shape: grown from the root by BestFirst
    while a slot is worth at least the pass's min_value (the engine sets it from the cost grid) and the option floor,
    up to the option nodes (and max_nodes when there is no min_value)."""

    name = "stand-dynamic"
    Options = DynamicStandOptions

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        deterministic = (not self.options.stochastic) or row.params.greedy
        # with a floor from the pass (min_value > 0) the size follows worth; an equal budget fills the asked nodes
        cap = self.options.nodes if min_value > 0.0 else self.size(max_nodes, self.options.nodes)
        floor = 0.0 if self.config.nodes is not None else max(min_value, self.options.floor)
        return self.draft_best_first(self.lookup_for(row), self._root_tail(row), self.rows[row.uid].noise,
                                     deterministic, cap, floor)

    def draft_best_first(self, table: NGramTable, root_tail: np.ndarray, noise: GumbelNoise, deterministic: bool,
                         cap: int, floor: float) -> DraftTree:
        grower = self._grower(table, noise, deterministic)
        grower.open(-1, tuple(root_tail.tolist()), 1.0)
        return grower.grow(cap, floor)


class HeuristicStandDrafter(StandDrafter):
    """STAND with the heuristic default tree instead of the calibrated one (an ablation)."""

    name = "stand-heuristic"

    def _load_template(self) -> TreeTemplate:
        return heuristic()

    def grown(self, m: int) -> TreeTemplate:
        return heuristic(m)
