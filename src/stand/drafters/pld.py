"""Prompt lookup decoding: copy what followed the latest earlier occurrence of the last n tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from stand.core.tree import DraftTree
from stand.core.drafter import Drafter


@dataclass
class PLDOptions:
    max_ngram: int = 3  # longest suffix looked up (then shorter ones, down to 1)
    num_tokens: int = 10  # most tokens copied


def earlier_matches(tokens: np.ndarray, max_n: int) -> Iterator[int]:
    """Where the continuation starts after every earlier occurrence of the last n tokens [L], for n = max_n down
    to 1, the most recent occurrence first."""
    L = len(tokens)
    for n in range(min(max_n, L - 1), 0, -1):
        windows = sliding_window_view(tokens[: L - 1], n)  # [L-n, n]: every n-gram that has a successor
        hits = np.flatnonzero((windows == tokens[L - n:]).all(axis=1))
        for h in hits[::-1].tolist():
            yield h + n


class PromptLookup(Drafter):
    name = "pld"
    Options = PLDOptions

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        """The continuation after the most recent earlier match of the longest suffix, as a chain."""
        tokens = np.asarray(row.tokens, dtype=np.int64)
        start = next(earlier_matches(tokens, self.options.max_ngram), None)
        size = self.size(max_nodes, self.options.num_tokens)
        return DraftTree.chain([] if start is None else tokens[start:start + size].tolist())
