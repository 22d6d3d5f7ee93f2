"""The drafter interface: token ids in, a DraftTree out; told afterwards what the target computed.

A drafter never touches the model. Rows of one `group` (the N samples of a question) may share
whatever a drafter learns.
"""

from __future__ import annotations

import numpy as np
import torch

from stand.params import SpecConfig
from stand.core.tree import DraftTree
from stand.core.sequence import Row
from stand.core.verify import Verdict


class Drafter:
    name = "base"
    default_nodes: int | None = None  # tree size the drafter prefers when no cost grid decides (None: its whole tree)
    wants_probs = False  # observe() receives the target's sampler distributions
    wants_prompt_probs = False  # start() receives the distributions over the prompt

    def __init__(self, config: SpecConfig, vocab_size: int):
        self.config = config
        self.vocab_size = vocab_size

    def start(self, row: Row, prompt_probs: torch.Tensor | None) -> None:
        """A row enters. prompt_probs: [P-1, V], the distribution after each prompt token but the last."""

    def propose(self, row: Row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        """The draft for the next step; the root is row.tokens[-1]. max_nodes: the nodes the pass asks of this
        row (a drafter may use it to pick its best nodes; the engine cuts any tree to the row's hard share of
        step_tokens, which is at least max_nodes).
        min_value: a node whose estimated chance of acceptance is below this costs more than it brings in this
        pass; a drafter that estimates the chance may leave such nodes out."""
        return DraftTree()

    def acceptance_curve(self) -> np.ndarray | None:
        """[M+1] expected tokens per step with m draft nodes (m = 0..M), if the drafter knows it; the engine
        then sizes each row's tree by the cost of a pass (budget.py)."""
        return None

    def observe(self, row: Row, tree: DraftTree, probs: torch.Tensor | None, verdict: Verdict) -> None:
        """After verification. row.tokens does not hold the new tokens yet; probs: [len(tree)+1, V]."""

    def finish(self, row: Row) -> None:
        """A row left the batch."""

    def memory_bytes(self) -> int:
        return 0
