"""Consensus drafting: the N samples of one question draft for each other (arXiv 2503.05330).

Every row of a group keeps its tokens and, for each generated token, the probability the target's
sampler gave it. A hash of k-grams to (row, position) covers all rows of the group and grows as
tokens are accepted. To draft for row i, its last k tokens are looked up in every row (its own
earlier text included) and in the group's prompt (one track, weighted by the target's probabilities
over the prompt); without a match (exact, then fuzzy if enabled) it backs off to its last k-1 .. 1
tokens, as prompt lookup does. The continuations (up to L tokens) are merged into a DAG where an equal
token at an equal depth is one node, and each edge gets

    w = alpha * mean_prob + (1 - alpha) * frequency

(mean_prob: mean target probability of the edge's token over the continuations that cross the
edge; frequency: those continuations over all continuations). Reading w as the chance the edge's
token is accepted, the chain draft is the path that maximises the expected accepted length
sum_d prod_{j<=d} w_j; the tree draft (option nodes > 0) keeps the nodes with the largest
products prod_{j<=d} w_j, best first. Drafts are deterministic (one-hot q).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from stand.core.tree import DraftTree
from stand.core.drafter import Drafter

MAX_MATCHES = 64  # most recent continuations merged per draft: bounds the cost as N grows


@dataclass
class ConsensusOptions:
    k: int = 3  # longest suffix looked up in the group's text (then shorter ones, down to 1)
    length: int = 10  # most tokens per continuation
    alpha: float = 0.5  # edge weight: alpha * mean target probability + (1 - alpha) * frequency
    nodes: int = 0  # 0: draft the best chain; > 0: a tree of this many nodes (the best branches)
    fuzzy: int = 0  # > 0: without an exact k-gram match, accept a token edit distance up to this


# ---------------------------------------------------------------------------------------------
# Per-row token tracks and the group's k-gram index


@dataclass
class Track:
    """One row's tokens and the target's probability of each token (1 where unknown).

    Continuations are drawn from positions >= first_start: a row's generated tokens; the group's
    prompt is a track of its own, so N rows that share it count it once.
    """

    first_start: int
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(64, dtype=np.int64))  # [cap]
    probs: np.ndarray = field(default_factory=lambda: np.ones(64, dtype=np.float64))  # [cap]
    n: int = 0
    done: bool = False

    def extend(self, tokens: list[int], probs=None) -> None:
        m = self.n + len(tokens)
        if m > len(self.tokens):
            cap = max(2 * len(self.tokens), m)
            self.tokens = np.resize(self.tokens, cap)
            self.probs = np.resize(self.probs, cap)
        self.tokens[self.n:m] = tokens
        self.probs[self.n:m] = 1.0 if probs is None else probs
        self.n = m

    def nbytes(self) -> int:
        return self.tokens.nbytes + self.probs.nbytes


PROMPT = -1  # the uid of a group's prompt track


class GroupIndex:
    """n-grams (n = 1..k) of every track of one group -> [(track uid, position of the next token)].

    An n-gram is indexed once the token after it exists, so every entry has a continuation.
    """

    def __init__(self, k: int):
        self.k = k
        self.tracks: dict[int, Track] = {}
        self.index: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self.entries = 0
        self.version = 0  # bumped by every append: keys the window cache
        self._window_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def add_prompt(self, tokens: list[int], probs=None) -> None:
        self.tracks[PROMPT] = Track(first_start=1, done=True)
        self.append(PROMPT, tokens, probs)

    def add_row(self, uid: int, tokens: list[int]) -> Track:
        track = Track(first_start=len(tokens))
        self.tracks[uid] = track
        self.append(uid, tokens)
        return track

    def append(self, uid: int, tokens: list[int], probs=None) -> None:
        """Adds tokens to a track and indexes the k-grams they continue."""
        track = self.tracks[uid]
        self.version += 1
        old = track.n
        track.extend(tokens, probs)
        toks = track.tokens
        for s in range(max(old, track.first_start, 1), track.n):  # s: continuation start
            gram = toks[max(s - self.k, 0):s].tolist()
            for n in range(1, len(gram) + 1):  # every order 1..k: lookups back off to shorter suffixes
                self.index.setdefault(tuple(gram[-n:]), []).append((uid, s))
            self.entries += len(gram)

    def matches(self, uid: int, limit: int, min_n: int | None = None) -> list[tuple[int, int]]:
        """The most recent (track, start) after an n-gram equal to row uid's last n tokens, for the
        longest n (k down to min_n, default k) that has any."""
        track = self.tracks[uid]
        tail = track.tokens[max(track.n - self.k, 0):track.n].tolist()
        for n in range(len(tail), (self.k if min_n is None else min_n) - 1, -1):
            hits = self.index.get(tuple(tail[-n:]))
            if hits:
                return hits[-limit:][::-1]
        return []

    def fuzzy_matches(self, uid: int, max_dist: int, limit: int) -> list[tuple[int, int]]:
        """(track, start) after windows within token edit distance max_dist of row uid's last k tokens."""
        track = self.tracks[uid]
        if track.n < self.k:
            return []
        query = track.tokens[track.n - self.k:track.n]
        srcs, starts = [], []
        for m in range(max(self.k - max_dist, 1), self.k + max_dist + 1):
            src, start, windows = self._windows(m)
            close = edit_distance_many(query, windows) <= max_dist  # [W]
            srcs.append(src[close])
            starts.append(start[close])
        pairs = np.unique(np.stack([np.concatenate(starts), np.concatenate(srcs)], 1), axis=0)  # [H, 2]
        pairs = pairs[::-1][:limit]  # latest starts first
        return [(int(src), int(start)) for start, src in pairs]

    def _windows(self, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every indexed window of m tokens, over all tracks: sources [W], starts [W], windows [W, m].

        Built once per group state (all rows of a step propose before any observes).
        """
        state = (self.version, m)
        if state not in self._window_cache:
            srcs, starts, windows = [], [], []
            for src, t in self.tracks.items():
                s = np.arange(max(t.first_start, m), t.n)  # continuation start; the window is [s-m, s)
                srcs.append(np.full(len(s), src))
                starts.append(s)
                windows.append(sliding_window_view(t.tokens[:t.n], m)[s - m] if len(s) else np.zeros((0, m), np.int64))
            if len(self._window_cache) > 8:
                self._window_cache.clear()
            self._window_cache[state] = (np.concatenate(srcs), np.concatenate(starts), np.concatenate(windows))
        return self._window_cache[state]

    def continuation(self, src: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.tracks[src]
        end = min(start + length, t.n)
        return t.tokens[start:end], t.probs[start:end]

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tracks.values()) + 96 * self.entries + 120 * len(self.index)


def edit_distance_many(query: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Levenshtein distance (token insert/delete/substitute) of query [k] to every window [W, m] -> [W]."""
    W, m = windows.shape
    prev = np.broadcast_to(np.arange(m + 1), (W, m + 1)).copy()  # distances from the empty query prefix
    for i, q in enumerate(query.tolist(), start=1):
        cur = np.empty_like(prev)
        cur[:, 0] = i
        sub = prev[:, :-1] + (windows != q)  # [W, m]
        dele = prev[:, 1:] + 1
        best = np.minimum(sub, dele)
        for j in range(1, m + 1):  # insertion chains along the row
            cur[:, j] = np.minimum(best[:, j - 1], cur[:, j - 1] + 1)
        prev = cur
    return prev[:, m]


# ---------------------------------------------------------------------------------------------
# The consensus DAG


@dataclass
class ConsensusDAG:
    """Continuations merged by (depth, token). Node 0 is the root (depth 0)."""

    tokens: list[int] = field(default_factory=lambda: [-1])  # [nodes]
    depths: list[int] = field(default_factory=lambda: [0])  # [nodes]
    ids: dict[tuple[int, int], int] = field(default_factory=dict)  # (depth, token) -> node
    counts: dict[tuple[int, int], int] = field(default_factory=dict)  # edge (u, v) -> continuations across it
    prob_sums: dict[tuple[int, int], float] = field(default_factory=dict)  # edge -> sum of target probs of v
    paths: int = 0

    def node(self, depth: int, token: int) -> int:
        key = (depth, token)
        if key not in self.ids:
            self.ids[key] = len(self.tokens)
            self.tokens.append(token)
            self.depths.append(depth)
        return self.ids[key]

    def add_path(self, tokens, probs) -> None:
        self.paths += 1
        u = 0
        for d, (t, p) in enumerate(zip(tokens, probs), start=1):
            v = self.node(d, int(t))
            self.counts[(u, v)] = self.counts.get((u, v), 0) + 1
            self.prob_sums[(u, v)] = self.prob_sums.get((u, v), 0.0) + float(p)
            u = v

    def weights(self, alpha: float) -> dict[tuple[int, int], float]:
        """Edge -> alpha * mean_prob + (1 - alpha) * frequency."""
        return {e: alpha * self.prob_sums[e] / c + (1 - alpha) * c / self.paths for e, c in self.counts.items()}

    def out_edges(self, weights: dict[tuple[int, int], float]) -> list[list[tuple[float, int]]]:
        """Per node, its (weight, child) edges, best first (ties: the child created first)."""
        out: list[list[tuple[float, int]]] = [[] for _ in self.tokens]
        for (u, v), w in weights.items():
            out[u].append((w, v))
        for edges in out:
            edges.sort(key=lambda x: (-x[0], x[1]))
        return out


def build_dag(continuations) -> ConsensusDAG:
    """continuations: iterable of (tokens, probs) pairs, each starting right after the root."""
    dag = ConsensusDAG()
    for tokens, probs in continuations:
        if len(tokens):
            dag.add_path(tokens, probs)
    return dag


def best_path(dag: ConsensusDAG, alpha: float) -> list[int]:
    """Tokens of the path maximising sum_d prod_{j<=d} w_j (expected accepted length)."""
    return [dag.tokens[v] for v, _ in best_path_edges(dag, alpha)]


def best_path_edges(dag: ConsensusDAG, alpha: float) -> list[tuple[int, float]]:
    """(node, weight of the edge into it) along the best path (see best_path)."""
    out = dag.out_edges(dag.weights(alpha))
    value = [0.0] * len(dag.tokens)
    choice: list[tuple[int, float]] = [(-1, 0.0)] * len(dag.tokens)
    for v in sorted(range(len(dag.tokens)), key=lambda n: -dag.depths[n]):  # children before parents
        for w, c in out[v]:
            if w * (1 + value[c]) > value[v]:
                value[v], choice[v] = w * (1 + value[c]), (c, w)
    path, v = [], choice[0]
    while v[0] >= 0:
        path.append(v)
        v = choice[v[0]]
    return path


def best_tree(dag: ConsensusDAG, alpha: float, budget: int) -> DraftTree:
    """The `budget` paths-prefixes with the largest prod w (a connected tree: products only shrink)."""
    out = dag.out_edges(dag.weights(alpha))
    tree = DraftTree()
    heap = [(-w, c, -1) for w, c in out[0]]  # (-score, dag node, parent in tree)
    heapq.heapify(heap)
    while heap and len(tree) < budget:
        neg, v, parent = heapq.heappop(heap)
        i = tree.add(dag.tokens[v], parent)
        for w, c in out[v]:
            heapq.heappush(heap, (neg * w, c, i))
    return tree


# ---------------------------------------------------------------------------------------------
# The drafter


def committed_probs(tree: DraftTree, probs, verdict) -> list[float]:
    """The sampler's probability of each committed token (accepted path, then the bonus)."""
    path = [0] + verdict.accepted
    toks = verdict.tokens(tree)
    return probs[path, toks].double().tolist()


def prompt_token_probs(prompt: list[int], dists) -> list[float] | None:
    """The target's probability of each prompt token after the ones before it (1 for the first)."""
    if dists is None or len(dists) != len(prompt) - 1:
        return None
    return [1.0] + dists.token_probs.tolist()


class ConsensusDrafter(Drafter):
    name = "consensus"
    Options = ConsensusOptions
    wants_probs = True

    def __init__(self, config, vocab_size: int):
        super().__init__(config, vocab_size)
        self.k = max(1, self.options.k)
        self.min_n = 1  # back off from k-grams to shorter suffixes when the k-gram has no match
        self.groups: dict[tuple[int, int], GroupIndex] = {}

    def prompt_topk(self) -> int:
        return 1  # the prompt's continuations are weighted by the target's probabilities of its tokens

    def start(self, row, prompt=None) -> None:
        key = row.group_key()
        if key not in self.groups:
            self.groups[key] = GroupIndex(self.k)
            question = list(row.prompt[: row.question_len])
            self.groups[key].add_prompt(question, prompt_token_probs(question, prompt))
        self.groups[key].add_row(row.uid, list(row.tokens))

    def _group(self, row) -> GroupIndex:
        if row.uid not in self.groups.get(row.group_key(), GroupIndex(self.k)).tracks:
            self.start(row)  # a row the engine did not start: index it now
        return self.groups[row.group_key()]

    def continuations(self, row, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
        group = self._group(row)
        hits = group.matches(row.uid, MAX_MATCHES)  # the k-gram
        fuzzy = self.options.fuzzy
        if not hits and fuzzy > 0:
            hits = group.fuzzy_matches(row.uid, fuzzy, MAX_MATCHES)
        if not hits:
            hits = group.matches(row.uid, MAX_MATCHES, self.min_n)  # back off to shorter suffixes
        return [group.continuation(src, start, length) for src, start in hits]

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        """The best chain (continuations up to the option length, or the asked nodes under an equal budget), or
        with the option nodes a tree of that many nodes (or the asked nodes)."""
        o = self.options
        nodes = self.size(max_nodes, o.nodes) if o.nodes > 0 else 0
        dag = build_dag(self.continuations(row, nodes or self.size(max_nodes, o.length)))
        if dag.paths == 0:
            return DraftTree()
        if nodes > 0:
            return best_tree(dag, o.alpha, nodes)
        return DraftTree.chain(best_path(dag, o.alpha))

    def observe(self, row, tree, probs, verdict) -> None:
        group = self._group(row)
        toks = verdict.tokens(tree)
        p = committed_probs(tree, probs, verdict) if probs is not None else None
        group.append(row.uid, toks, p)

    def finish(self, row) -> None:
        key = row.group_key()
        group = self.groups.get(key)
        if group is None or row.uid not in group.tracks:
            return
        group.tracks[row.uid].done = True  # its text still drafts for the rows left
        if all(t.done for t in group.tracks.values()):
            del self.groups[key]

    def memory_bytes(self) -> int:
        return sum(g.nbytes() for g in self.groups.values())
