"""Draft trees: what a drafter proposes and the verifier walks.

Node indices used by the engine and the verifier count the root as 0: the root is the last
committed token (its KV is not cached yet), draft node i of a DraftTree is node i + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SparseDist:
    """A draft distribution q over a few tokens: ids [K], probs [K] summing to 1."""

    ids: np.ndarray  # [K] int64
    probs: np.ndarray  # [K] float64

    def __post_init__(self):
        object.__setattr__(self, "ids", np.asarray(self.ids, dtype=np.int64))
        object.__setattr__(self, "probs", np.asarray(self.probs, dtype=np.float64))


@dataclass
class DraftTree:
    """Draft tokens in topological order (a parent before its children).

    Siblings appear in the order they were drawn. `qs[i]` is the distribution node i was drawn
    from (the same object for siblings drawn together without replacement), or None for a
    deterministic draft (one-hot q). `tags[i]` is free for the drafter (e.g. a template node id).
    """

    tokens: list[int] = field(default_factory=list)  # [M]
    parents: list[int] = field(default_factory=list)  # [M], -1 = root
    qs: list[SparseDist | None] = field(default_factory=list)  # [M]
    tags: list[int] = field(default_factory=list)  # [M]

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int = -1, q: SparseDist | None = None, tag: int = -1) -> int:
        """Append a node; returns its index in this tree (not counting the root)."""
        assert parent < len(self.tokens), "parents must come before children"
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        self.qs.append(q)
        self.tags.append(int(tag))
        return len(self.tokens) - 1

    @classmethod
    def chain(cls, tokens) -> "DraftTree":
        """A deterministic chain, as prompt lookup drafts it."""
        tree = cls()
        for i, t in enumerate(tokens):
            tree.add(t, i - 1)
        return tree

    def depths(self) -> np.ndarray:
        """[M] depth of each node; children of the root have depth 1."""
        return depths_of(self.parents)

    def subtree(self, keep) -> "DraftTree":
        """The nodes where keep [M] (bool) is True, in order; keep must hold the parent of every kept node."""
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return self
        idx = np.flatnonzero(keep).tolist()
        return DraftTree([self.tokens[i] for i in idx], kept_parents(self.parents, keep), [self.qs[i] for i in idx],
                         [self.tags[i] for i in idx])

    def clip(self, max_depth: int) -> "DraftTree":
        """The nodes at depth <= max_depth (0 leaves only the root)."""
        return self.subtree(self.depths() <= max_depth)

    def prefix(self, k: int) -> "DraftTree":
        """The first k nodes: still a tree (parents come first), siblings still in draw order."""
        return self.subtree(np.arange(len(self)) < k)

    def max_leaves(self, k: int) -> "DraftTree":
        """The longest prefix with at most k >= 1 leaves (a prefix is still a tree)."""
        has_child, leaves = set(), 0
        for i, p in enumerate(self.parents):
            grows = p < 0 or p in has_child  # a new branch, not the extension of a leaf
            if grows and leaves + 1 > k and leaves > 0:
                return self.prefix(i)
            leaves += grows
            has_child.add(p)
        return self

    def children(self) -> list[list[int]]:
        """Children of every node in root-0 indexing: children()[0] are the root's."""
        kids: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents):
            kids[p + 1].append(i + 1)
        return kids

    def ancestor_matrix(self) -> np.ndarray:
        """[M+1, M+1] bool, root included: a[i, j] is True if j is i or an ancestor of i."""
        n = len(self.tokens) + 1
        a = np.zeros((n, n), dtype=bool)
        a[0, 0] = True
        for i, p in enumerate(self.parents):
            a[i + 1] = a[p + 1]
            a[i + 1, i + 1] = True
        return a


def depths_of(parents) -> np.ndarray:
    """[M] depth of each node from its parent [M] (-1 = the root, parents first); the root's children: 1."""
    d = np.zeros(len(parents), dtype=np.int64)
    for i, p in enumerate(parents):
        d[i] = 1 if p < 0 else d[p] + 1
    return d


def kept_parents(parents, keep) -> list[int]:
    """The parent of every kept node (keep [M] bool, closed under parents), numbered among the kept nodes."""
    remap = np.cumsum(keep) - 1  # [M] index of each node among the kept ones
    return [-1 if p < 0 else int(remap[p]) for p, k in zip(parents, keep) if k]


def graft(base: DraftTree, extra: DraftTree, tag: int | None = None) -> tuple[DraftTree, int]:
    """base (copied) with extra's paths added where they are new; returns (tree, nodes added).

    Each node of extra is the first node of equal (parent, token) where there is one, else a new node at the end
    (after the siblings it joins, so the verifier tries it last there), tagged `tag` (default: its own tag).
    extra's nodes must be deterministic (q=None) and in topological order.
    """
    tree = DraftTree(list(base.tokens), list(base.parents), list(base.qs), list(base.tags))
    nodes: dict[tuple[int, int], int] = {}  # (parent, token) -> node, first occurrence
    for i, key in enumerate(zip(tree.parents, tree.tokens)):
        nodes.setdefault(key, i)
    where: list[int] = []  # extra node -> tree node
    for tok, par, own in zip(extra.tokens, extra.parents, extra.tags):
        key = (-1 if par < 0 else where[par], tok)
        if key not in nodes:
            nodes[key] = tree.add(tok, key[0], None, own if tag is None else tag)
        where.append(nodes[key])
    return tree, len(tree) - len(base)
