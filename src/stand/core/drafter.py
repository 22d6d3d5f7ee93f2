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


@dataclass
class PromptDists:
    """The target's sampler distribution after each prompt token but the last, kept sparse (filled chunk by chunk
    as the prompt is prefilled, so no [prompt, vocabulary] tensor is ever held): its top-k and the chance of the
    prompt's own next token."""

    ids: np.ndarray  # [P-1, k] int64, most likely first
    probs: np.ndarray  # [P-1, k] float64
    token_probs: np.ndarray  # [P-1] float64

    @classmethod
    def empty(cls, n: int, k: int) -> "PromptDists":
        return cls(np.zeros((n, k), dtype=np.int64), np.zeros((n, k)), np.ones(n))

    def __len__(self) -> int:
        return len(self.token_probs)

    def fill(self, start: int, probs: torch.Tensor, next_tokens: list[int]) -> None:
        """probs [C, V]: the distributions after prompt tokens start..start+C-1; next_tokens: the C tokens after."""
        k = self.ids.shape[1]
        vals, ids = torch.topk(probs.float(), min(k, probs.shape[-1]), dim=-1)  # [C, k]
        end = start + len(probs)
        self.ids[start:end, : ids.shape[1]] = ids.numpy()
        self.probs[start:end, : ids.shape[1]] = vals.double().numpy()
        self.token_probs[start:end] = probs[torch.arange(len(probs)), torch.tensor(next_tokens)].double().numpy()


class Drafter:
    name = "base"
    Options: type = NoOptions  # the drafter's own knobs, a dataclass filled from SpecConfig.options
    default_nodes: int | None = None  # tree size the drafter prefers when no cost grid decides (None: its whole tree)
    wants_probs = False  # observe() receives the target's sampler distributions

    def __init__(self, config: SpecConfig, vocab_size: int):
        self.config = config
        self.vocab_size = vocab_size
        self.options = parse_options(self.Options, config.options, config.method)

    def prompt_topk(self) -> int:
        """How many of the most likely tokens after each prompt token start() wants (0: no prompt distributions)."""
        return 0

    def start(self, row: Row, prompt: PromptDists | None) -> None:
        """A row enters. prompt: the target's distributions over the prompt, if prompt_topk() asked for them."""

    def propose(self, row: Row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        """The draft for the next step; the root is row.tokens[-1]. max_nodes: the nodes the pass asks of this
        row (a drafter may use it to pick its best nodes; the engine cuts any tree to the row's hard share of
        step_tokens, which is at least max_nodes).
        min_value: a node whose estimated chance of acceptance is below this costs more than it brings in this
        pass; a drafter that estimates the chance may leave such nodes out."""
        return DraftTree()

    def acceptance_curve(self) -> np.ndarray | None:
        """[M+1] expected tokens per step with m draft nodes (m = 0..M), if the drafter knows it; the engine
        then sizes each row's tree by the cost of a pass (core/sizing.py)."""
        return None

    def observe(self, row: Row, tree: DraftTree, probs: torch.Tensor | None, verdict: Verdict) -> None:
        """After verification. row.tokens does not hold the new tokens yet; probs: [len(tree)+1, V]."""

    def finish(self, row: Row) -> None:
        """A row left the batch."""

    def memory_bytes(self) -> int:
        return 0
