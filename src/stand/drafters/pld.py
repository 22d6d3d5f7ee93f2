"""Prompt lookup decoding: copy what followed the latest earlier occurrence of the last n tokens."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from stand.core.tree import DraftTree
from stand.core.drafter import Drafter


def lookup(tokens: np.ndarray, max_ngram: int, num_tokens: int) -> list[int]:
    """The continuation after the most recent earlier match of the longest suffix (max_ngram..1)."""
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), 0, -1):
        windows = sliding_window_view(tokens[: L - 1], n)  # [L-n, n]: every n-gram that has a successor
        hits = np.flatnonzero((windows == tokens[L - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + num_tokens].tolist()
    return []


class PromptLookup(Drafter):
    name = "pld"

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        tokens = np.asarray(row.tokens, dtype=np.int64)
        return DraftTree.chain(lookup(tokens, self.config.pld_max_ngram, self.config.pld_num_tokens))
