"""Token Recycling: an adjacency table of the k likeliest next tokens of every token, expanded over a static tree.

Every distribution the target computes (prompt positions at prefill, every verified tree node)
overwrites the row of the token it follows with its top-k next tokens; the matrix persists for
the drafter's lifetime, across rows and prompts, as in the paper. A draft fills a static tree
template breadth-first: the rank-r child of a node is the r-th entry of its token's row. Drafts
are deterministic (one-hot q).
"""

from __future__ import annotations

import numpy as np
import torch

from stand.drafters.templates import DEFAULT_SIZE, heuristic
from stand.core.tree import DraftTree
from stand.core.drafter import Drafter


class TokenRecycling(Drafter):
    name = "recycle"
    wants_probs = True
    wants_prompt_probs = True

    def __init__(self, config, vocab_size: int):
        super().__init__(config, vocab_size)
        self.k = config.recycle_k
        self.adj = np.full((vocab_size, self.k), -1, dtype=np.int32)  # [V, k] next tokens, best first
        self.template = heuristic(DEFAULT_SIZE, max_children=self.k)
        self.kids = self.template.children()

    def _update(self, tokens, probs: torch.Tensor) -> None:
        """tokens [N] each followed by distribution probs [N, V]: overwrite their rows (later ones win)."""
        ids = torch.topk(probs.float(), self.k, dim=-1).indices.numpy().astype(np.int32)  # [N, k]
        tokens = np.asarray(tokens, dtype=np.int64)
        last = len(tokens) - 1 - np.unique(tokens[::-1], return_index=True)[1]  # the last occurrence of each token
        self.adj[tokens[last]] = ids[last]

    def start(self, row, prompt_probs) -> None:
        if prompt_probs is not None and len(prompt_probs):
            self._update(row.prompt[: len(prompt_probs)], prompt_probs)

    def observe(self, row, tree: DraftTree, probs, verdict) -> None:
        if probs is not None:
            self._update([row.tokens[-1]] + tree.tokens, probs[: len(tree) + 1])

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        tree = DraftTree()
        frontier = [(-1, -1, row.tokens[-1])]  # (template node, tree node, token)
        while frontier:
            nxt = []
            for tnode, node, tok in frontier:
                row_ids = self.adj[tok]
                for child in self.kids[tnode + 1]:
                    cand = int(row_ids[self.template.ranks[child]])
                    if cand >= 0:
                        nxt.append((child, tree.add(cand, node, None, child), cand))
            frontier = nxt
        return tree

    def memory_bytes(self) -> int:
        return self.adj.nbytes
