"""Token Recycling (arXiv 2408.08696): an adjacency table of the k likeliest next tokens of every token, expanded
over a static tree.

Every distribution the target computes (prompt positions at prefill, every verified tree node)
overwrites the row of the token it follows with its top-k next tokens; the matrix persists for
the drafter's lifetime, across rows and prompts, as in the paper. A draft fills a static tree
template breadth-first: the rank-r child of a node is the r-th entry of its token's row. Drafts
are deterministic (one-hot q).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stand.drafters.stand import top_dist
from stand.drafters.templates import DEFAULT_SIZE, fill, heuristic
from stand.core.tree import DraftTree
from stand.core.drafter import Drafter, PromptDists


@dataclass
class RecycleOptions:
    k: int = 8  # next tokens kept per token (and most children of a tree node)


class TokenRecycling(Drafter):
    name = "recycle"
    Options = RecycleOptions
    wants_probs = True

    def __init__(self, config, vocab_size: int):
        super().__init__(config, vocab_size)
        self.k = self.options.k
        self.adj = np.full((vocab_size, self.k), -1, dtype=np.int32)  # [V, k] next tokens, best first
        self.kids: dict[int, list[list[int]]] = {}  # tree size -> children lists of its static template

    def _update(self, tokens, ids: np.ndarray) -> None:
        """tokens [N] each followed by top-k next tokens ids [N, k]: overwrite their rows (later ones win)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        last = len(tokens) - 1 - np.unique(tokens[::-1], return_index=True)[1]  # the last occurrence of each token
        self.adj[tokens[last]] = ids[last]

    def prompt_topk(self) -> int:
        return self.k

    def start(self, row, prompt: PromptDists | None) -> None:
        if prompt is not None and len(prompt):
            self._update(row.prompt[: len(prompt)], prompt.ids[:, : self.k])

    def observe(self, row, tree: DraftTree, probs, verdict) -> None:
        if probs is not None:
            self._update([row.tokens[-1]] + tree.tokens, top_dist(probs[: len(tree) + 1], self.k)[0])

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        """The static tree (DEFAULT_SIZE nodes, or the asked nodes under an equal budget) filled from the matrix."""
        return fill(self.template(self.size(max_nodes, DEFAULT_SIZE)), row.tokens[-1], self._next)

    def template(self, size: int) -> list[list[int]]:
        """Children lists of the static tree of `size` nodes (at most k children a node)."""
        if size not in self.kids:
            self.kids[size] = heuristic(size, max_children=self.k).children()
        return self.kids[size]

    def _next(self, token: int, n: int) -> list[tuple[int, None, int]]:
        """The n likeliest next tokens of `token` (none before its row is written), each drafted with one-hot q."""
        return [(t, None, t) for t in self.adj[token][:n].tolist() if t >= 0]

    def memory_bytes(self) -> int:
        return self.adj.nbytes
