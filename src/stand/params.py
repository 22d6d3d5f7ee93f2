"""Configuration dataclasses: how to sample, and how to speculate."""

from __future__ import annotations

import math
from numbers import Integral, Real
from dataclasses import dataclass, field

from stand.errors import StandError
from stand.methods import check_method


# the smallest temperature above 0: below it float32 logits / T overflow (1e-45 gave NaN probabilities), and long
# before that sampling is greedy in all but rounding; such temperatures are refused (0 asks for greedy)
MIN_TEMPERATURE = 1e-3
SEED_LIMIT = 2**63  # seeds are integers in [0, 2^63)


@dataclass
class SamplingParams:
    """What the target samples from. temperature=0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, Real) or not math.isfinite(t) or t < 0:
            raise StandError(f"temperature must be >= 0 and finite, got {t}")
        if 0 < t < MIN_TEMPERATURE:
            raise StandError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {t}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, Real) or not 0.0 < self.top_p <= 1.0:
            raise StandError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise StandError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise StandError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, Integral)
                                      or not 0 <= self.seed < SEED_LIMIT):
            raise StandError(f"seed must be an integer in [0, 2^63), got {self.seed}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise StandError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        return self


@dataclass
class SpecConfig:
    """Which drafter proposes, what every drafter shares, and the drafter's own knobs.

    options: the drafter's own knobs by name (each drafter declares them as its Options dataclass, e.g.
    {"max_ngram": 2} for pld); a name the method's drafter does not declare is an error.
    """

    method: str = "none"
    step_tokens: int | None = 64  # most tokens per verification pass over all rows of a batch (None: no cap)
    cost_grid: str | None = None  # cost grid JSON that sizes trees per pass; None: the one stored with the tree; "off"
    tree: str | None = None  # path to a tree JSON, or None for the default
    table_path: str | None = None  # warm start / persistence of a drafter's table
    share_across_prompts: bool = False  # one table for the whole run instead of one per question
    options: dict = field(default_factory=dict)
    nodes: int | None = None  # every row is asked for this many draft nodes each pass (equal budgets; no cost sizing)

    def validate(self) -> "SpecConfig":
        check_method(self.method)
        if self.step_tokens is not None and self.step_tokens < 1:
            raise StandError(f"step_tokens must be >= 1, got {self.step_tokens}")
        if self.nodes is not None and (isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or self.nodes < 0):
            raise StandError(f"nodes must be an integer >= 0, got {self.nodes!r}")
        if not isinstance(self.options, dict):
            raise StandError(f"options must be a dict of the drafter's knobs, got {self.options!r}")
        return self
