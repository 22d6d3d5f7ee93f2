"""The drafter interface: token ids in, a DraftTree out; told afterwards what the target computed.

A drafter never touches the model. Rows of one `group` (the N samples of a question) may share
whatever a drafter learns.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from stand.errors import StandError
from stand.params import SpecConfig
from stand.core.tree import DraftTree
from stand.core.sequence import Row
from stand.core.verify import Verdict


@dataclass
class NoOptions:
    """The options of a drafter without knobs of its own."""


def parse_options(options_class: type, given: dict, method: str):
    """SpecConfig.options as the drafter's options dataclass; StandError naming a knob it does not declare or a
    value not of its default's type."""
    known = {f.name: f.default for f in fields(options_class)}
    for key, value in given.items():
        if key not in known:
            raise StandError(f"method {method!r} has no option {key!r}; its options: {', '.join(known) or 'none'}")
        if not _fits(value, known[key]):
            raise StandError(f"option {key!r} of method {method!r} must be {type(known[key]).__name__}, got {value!r}")
    return options_class(**given)


def _fits(value, default) -> bool:
    """value has the type of default: an int fits a float, a bool fits only a bool, anything fits None."""
    if default is None:
        return True
    if isinstance(value, bool) or isinstance(default, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    return isinstance(value, (int, float) if isinstance(default, float) else type(default))


class Drafter:
    name = "base"
    Options: type = NoOptions  # the drafter's own knobs, a dataclass filled from SpecConfig.options
    default_nodes: int | None = None  # tree size the drafter prefers when no cost grid decides (None: its whole tree)
    wants_probs = False  # observe() receives the target's sampler distributions
    wants_prompt_probs = False  # start() receives the distributions over the prompt

    def __init__(self, config: SpecConfig, vocab_size: int):
        self.config = config
        self.vocab_size = vocab_size
        self.options = parse_options(self.Options, config.options, config.method)

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
