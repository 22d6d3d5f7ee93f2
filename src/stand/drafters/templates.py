"""Tree templates: the shape a tree drafter fills, as a list of nodes (parent, rank).

Node j has a parent (-1 = the root) and a rank r: it receives the r-th token drawn at its parent.
A template is kept normalised: nodes ordered by depth, then parent, then rank, and the ranks of
every node's children are 0..m-1 (a child never waits on a sibling draw that is not in the tree,
which the lossless verifier relies on).

`heuristic` builds a template by best-first expansion under an acceptance prior: the value of a
node is the product over its path of prior[rank], the chance that the token of that rank is the
one accepted; the `size` highest-valued nodes form a connected tree (a child is worth less than its
parent and than its next-lower-rank sibling).
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from stand.core.files import read_json, write_json
from stand.core.tree import DraftTree, depths_of, kept_parents
from stand.errors import StandError

# Acceptance prior per rank for the default tree: rank 0 is right about 60% of the time.
DEFAULT_PRIOR = (0.6, 0.15, 0.07, 0.04, 0.025, 0.015, 0.01, 0.007, 0.005, 0.004)
# A deep prior for the large calibration template (about 600 nodes, depth >= 16).
DEEP_PRIOR = (0.82, 0.1, 0.04, 0.02, 0.012, 0.008, 0.005, 0.004, 0.003, 0.002)
DEFAULT_SIZE = 24
LARGE_SIZE = 600
TREE_FORMAT = "stand-tree"
SHIPPED_TREE = "smollm2-135m-instruct.tree.json"


@dataclass(frozen=True)
class TreeTemplate:
    parents: tuple[int, ...]  # [M] parent node id, -1 = root
    ranks: tuple[int, ...]  # [M] draw rank at the parent
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if len(self.parents) != len(self.ranks):
            raise StandError("a tree template needs one rank per node")
        for j, (p, r) in enumerate(zip(self.parents, self.ranks)):
            if not -1 <= p < j or r < 0:
                raise StandError(f"tree template node {j}: parent {p} must come before it and rank {r} be >= 0")

    def __len__(self) -> int:
        return len(self.parents)

    @classmethod
    def from_pairs(cls, pairs, meta: dict | None = None) -> "TreeTemplate":
        """Any list of (parent, rank) with parents before children; normalised."""
        parents = [int(p) for p, _ in pairs]
        ranks = [int(r) for _, r in pairs]
        return normalise(parents, ranks, meta or {})[0]

    def children(self, keep=None) -> list[list[int]]:
        """children()[0]: the root's children, children()[j + 1]: node j's, each in rank order; with `keep`
        (node ids closed under parents), only the kept nodes, ids unchanged."""
        kept = None if keep is None else {int(k) for k in keep}
        kids: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for j, p in enumerate(self.parents):
            if kept is None or j in kept:
                kids[p + 1].append(j)
        return [sorted(k, key=lambda j: self.ranks[j]) for k in kids]

    def depths(self) -> np.ndarray:
        return depths_of(self.parents)

    @property
    def depth(self) -> int:
        return int(self.depths().max()) if len(self) else 0

    def subset(self, keep) -> tuple["TreeTemplate", list[int]]:
        """The template restricted to `keep` (must be closed under parents); also the old id of each new node."""
        keep = sorted(set(int(k) for k in keep))
        mask = np.zeros(len(self), dtype=bool)
        mask[keep] = True
        if any(self.parents[k] >= 0 and not mask[self.parents[k]] for k in keep):
            raise StandError("a template subset must contain the parent of every node it keeps")
        ranks = [self.ranks[k] for k in keep]
        tmpl, order = normalise(kept_parents(self.parents, mask), ranks, dict(self.meta))
        return tmpl, [keep[i] for i in order]

    def to_json(self, path: str, provenance: dict | None = None) -> None:
        doc = {"format": TREE_FORMAT, "version": 1, "nodes": [[p, r] for p, r in zip(self.parents, self.ranks)],
               "size": len(self), "depth": self.depth, "provenance": provenance or self.meta}
        write_json(path, doc)

    @classmethod
    def load(cls, path: str) -> "TreeTemplate":
        doc = read_json(path, "tree file")
        if not isinstance(doc, dict) or doc.get("format") != TREE_FORMAT or not isinstance(doc.get("nodes"), list):
            raise StandError(f"{path} is not a stand tree file (expected format {TREE_FORMAT!r} with a node list)")
        if not isinstance(doc.get("provenance", {}), dict):
            raise StandError(f"tree file {path}: provenance must be an object, got {type(doc['provenance']).__name__}")
        try:
            return cls.from_pairs([(p, r) for p, r in doc["nodes"]], doc.get("provenance", {}))
        except (TypeError, ValueError) as e:
            raise StandError(f"tree file {path} has malformed nodes: {e}") from e


def normalise(parents: list[int], ranks: list[int], meta: dict) -> tuple[TreeTemplate, list[int]]:
    """Reorders by (depth, parent, rank) and re-ranks each sibling set to 0..m-1; returns the old id per new node."""
    n = len(parents)
    for j, p in enumerate(parents):
        if not -1 <= p < j:
            raise StandError(f"tree template node {j}: parent {p} must come before it")
    depth = depths_of(parents).tolist()
    new_of: dict[int, int] = {}
    order: list[int] = []
    for d in range(1, max(depth, default=0) + 1):
        level = [j for j in range(n) if depth[j] == d]
        level.sort(key=lambda j: (-1 if parents[j] < 0 else new_of[parents[j]], ranks[j], j))
        for j in level:
            new_of[j] = len(order)
            order.append(j)
    new_parents = [-1 if parents[j] < 0 else new_of[parents[j]] for j in order]
    new_ranks, seen = [], {}
    for p in new_parents:
        new_ranks.append(seen.get(p, 0))
        seen[p] = new_ranks[-1] + 1
    return TreeTemplate(tuple(new_parents), tuple(new_ranks), meta), order


def most_valuable(values, m: int) -> np.ndarray:
    """Ids of the m highest values, ties to the lower id. Where a node is worth no more than its parent (an
    earlier id), these form a connected tree."""
    return np.lexsort((np.arange(len(values)), -np.asarray(values)))[:m]


def fill(kids: list[list[int]], root, expand) -> DraftTree:
    """A draft over a template (its children lists, possibly cut), filled breadth-first from the root.

    expand(state, n) gives up to n (token, q, state) for a node's children in draw order: the r-th becomes the
    node's rank-r template child, tagged with that child's template id. Nodes the template gives no children are
    not expanded; a node that gets no children loses its subtree.
    """
    tree = DraftTree()
    frontier = [(-1, -1, root)]  # (template node, tree node, state)
    while frontier:
        nxt = []
        for tnode, node, state in frontier:
            here = kids[tnode + 1]
            if here:
                for child, (token, q, after) in zip(here, expand(state, len(here))):
                    nxt.append((child, tree.add(token, node, q, child), after))
        frontier = nxt
    return tree


def heuristic(size: int = DEFAULT_SIZE, prior=DEFAULT_PRIOR, max_children: int | None = None) -> TreeTemplate:
    """The `size` nodes of highest prior path value, grown best-first from the root."""
    prior = list(prior)
    width = min(len(prior), max_children or len(prior))
    pairs: list[tuple[int, int]] = []
    heap = [(-prior[0], 0, -1, 0)]  # (-value, tiebreak, parent, rank)
    tie = 1
    while heap and len(pairs) < size:
        negv, _, parent, rank = heapq.heappop(heap)
        j = len(pairs)
        pairs.append((parent, rank))
        v = -negv
        heapq.heappush(heap, (-v * prior[0], tie, j, 0))  # first child
        tie += 1
        if rank + 1 < width:  # next sibling: value of the parent times the next rank's prior
            heapq.heappush(heap, (negv / prior[rank] * prior[rank + 1], tie, parent, rank + 1))
            tie += 1
    return TreeTemplate.from_pairs(pairs, {"kind": "heuristic", "size": size, "prior": prior[:width]})


def large_template(size: int = LARGE_SIZE) -> TreeTemplate:
    """The calibration starting point: about 600 nodes and depth >= 16 under the deep prior."""
    return heuristic(size, DEEP_PRIOR)


def grown_tree(meta: dict, m: int) -> TreeTemplate | None:
    """The m most accepted nodes of the large template a calibrated tree was cut from, from the counts of all its
    nodes that the tree's provenance keeps (template_hits, large_template); None where it keeps none."""
    hits, large = meta.get("template_hits"), meta.get("large_template")
    if not isinstance(hits, list) or not isinstance(large, dict):
        return None
    template = heuristic(int(large.get("size", 0)), tuple(large.get("prior") or DEEP_PRIOR))
    if len(template) != len(hits):
        return None
    return template.subset(most_valuable(np.asarray(hits, dtype=np.float64), min(m, len(template))))[0]


def shipped_tree_path() -> str | None:
    """The calibrated tree shipped for the default model, if the package has it."""
    try:
        path = resources.files("stand") / "data" / SHIPPED_TREE
        return str(path) if path.is_file() else None
    except (ModuleNotFoundError, FileNotFoundError):
        return None


def check_vocab(template: TreeTemplate, vocab_size: int, source: str) -> None:
    """Warns when a tree calibrated for one model's vocabulary is used with another."""
    want = template.meta.get("vocab_size")
    if want is not None and int(want) != int(vocab_size):
        warnings.warn(f"tree {source} was calibrated for {template.meta.get('model', 'another model')} "
                      f"(vocabulary {want}); this model's vocabulary is {vocab_size}", stacklevel=3)
