"""How STAND draws from its table: what a sample looks up (its own latest and its question's table), fresh Gumbel
noise, a node's children without replacement (Gumbel-Top-K), and trees grown best first where the table is surest
(stand-dynamic's trees, and the nodes a template leaves unfilled)."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import numpy as np

from stand.core.tree import DraftTree, SparseDist
from stand.drafters.ngram_table import NGramTable

NOISE_BLOCK = 1 << 14


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


class OwnFirst:
    """A sample's lookup over two tables: its own (each context's latest distribution in this sample) and the shared
    one of its question (what every sample wrote, merged as that table merges). The longer match wins, the sample's
    own on a tie: within a sample the latest successor of a context (a loop's next token), across samples the
    shared entries where the sample has none as long. Handles: slot * 2 (own) or slot * 2 + 1 (shared)."""

    def __init__(self, own: NGramTable, shared: NGramTable):
        self.own, self.shared = own, shared

    def longest(self, tail, min_n: int = 1) -> tuple[int, int]:
        slot, n = self.own.longest(tail, min_n)
        if n < self.shared.max_n:
            other, m = self.shared.longest(tail, max(min_n, n + 1))
            if other >= 0:
                return 2 * other + 1, m
        return (2 * slot if slot >= 0 else -1), n

    def dist(self, handle: int) -> tuple[np.ndarray, np.ndarray]:
        return (self.shared if handle % 2 else self.own).dist(handle // 2)


@dataclass
class Draw:
    """A node's children drawn from the table: every stored token in draw order [K'], and the q drawn from."""

    tokens: np.ndarray  # [K'] int64
    q: np.ndarray  # [K'] float64, in the table's order
    dist: SparseDist | None  # q as recorded on the drawn nodes (None for deterministic drafts: one-hot q)


def draw(table: NGramTable, tail: tuple, noise: GumbelNoise, deterministic: bool, min_n: int = 1,
         sharpen: float = 1.0) -> Draw | None:
    """Draws from the table's top-k after the longest stored suffix of tail of at least min_n tokens (None without
    one): without replacement by Gumbel-Top-K on fresh noise from q ~ p^sharpen, or by rank when deterministic."""
    slot, _ = table.longest(tail, min_n)
    if slot < 0:
        return None
    ids, p = table.dist(slot)
    if len(ids) == 0:
        return None
    q = p if sharpen == 1.0 else p ** sharpen
    q = q / q.sum()  # [K'] the distribution sampled from, recorded exactly
    keys = -q if deterministic else -(np.log(q) + noise.take(len(q)))
    return Draw(ids[np.argsort(keys, kind="stable")], q, None if deterministic else SparseDist(ids, q))


class BestFirst:
    """Grows a draft tree slot by slot, best first: the slot for the r-th draw at a node is worth v(node) * q_r, where
    q_r is the r-th largest probability of the node's table distribution and v(root) = 1 (an estimate of the chance
    the draw is accepted, known before the draw is made).

    Lossless: whether a draw is made depends on the path to its node, on earlier draws and on other branches, never on
    the draw itself or later ones (a slot's worth never exceeds its parent's or an earlier sibling's, and ties go to
    the node created first), which is all the recursive rejection verifier needs.
    """

    def __init__(self, table: NGramTable, noise: GumbelNoise, deterministic: bool, min_n: int = 1, sharpen: float = 1.0,
                 tree: DraftTree | None = None):
        self.table, self.noise, self.deterministic = table, noise, deterministic
        self.min_n, self.sharpen = min_n, sharpen
        self.tree = tree if tree is not None else DraftTree()
        self.heap: list[tuple[float, int, int, int]] = []  # (-worth, tiebreak, node, rank); node -1 = the root
        self.opened: dict[int, tuple] = {}  # node -> (tokens in draw order, q, sorted probabilities, worth, tail)
        self.tick = itertools.count()

    def open(self, node: int, tail: tuple, worth: float, d: Draw | None = None, used: int = 0) -> None:
        """Makes the node's draws available from rank `used` on: d, the draw already made there, else a new one."""
        d = d if d is not None else draw(self.table, tail, self.noise, self.deterministic, self.min_n, self.sharpen)
        if d is not None and used < len(d.tokens):
            self.opened[node] = (d.tokens, d.dist, np.sort(d.q)[::-1], worth, tail)
            heapq.heappush(self.heap, (-worth * self.opened[node][2][used], next(self.tick), node, used))

    def grow(self, cap: int, floor: float) -> DraftTree:
        """Adds the best slot while the tree has fewer than cap nodes and the slot is worth at least floor."""
        tree, heap = self.tree, self.heap
        while heap and len(tree) < cap:
            neg, _, node, rank = heapq.heappop(heap)
            if -neg < floor:
                break
            drawn, dist, sorted_q, worth, tail = self.opened[node]
            idx = tree.add(int(drawn[rank]), node, dist)
            if rank + 1 < len(drawn):
                heapq.heappush(heap, (-worth * sorted_q[rank + 1], next(self.tick), node, rank + 1))
            self.open(idx, tail[1:] + (int(drawn[rank]),), -neg)
        return tree
