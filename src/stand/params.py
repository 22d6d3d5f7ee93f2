"""Configuration dataclasses: how to sample, and how to speculate."""

from __future__ import annotations

from dataclasses import dataclass, field

from stand.errors import StandError


# every --method; drafters/registry.py maps each to its drafter class
METHODS = ("none", "pld", "stand", "stand-heuristic", "stand-dynamic", "recycle", "consensus", "ngrammys",
           "stand+consensus")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise StandError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
    return method


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
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise StandError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise StandError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise StandError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise StandError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise StandError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        return self


@dataclass
class SpecConfig:
    """Which drafter proposes, and its knobs (each drafter reads the ones it knows)."""

    method: str = "none"
    step_tokens: int | None = 64  # most tokens per verification pass over all rows of a batch (None: no cap)
    cost_grid: str | None = None  # cost grid JSON that sizes trees per pass; None: the one stored with the tree; "off"
    # prompt lookup
    pld_max_ngram: int = 3
    pld_num_tokens: int = 10
    # STAND
    max_n: int = 4
    table_topk: int = 10
    table_capacity: int = 1 << 18
    stochastic: bool = True
    tree: str | None = None  # path to a tree JSON, or None for the default
    table_path: str | None = None  # warm start / persistence
    share_across_prompts: bool = False
    dynamic_nodes: int = 32  # stand-dynamic: most draft nodes per row
    dynamic_floor: float = 0.02  # stand-dynamic: least estimated acceptance of a node (the pass may ask for more)
    # Token Recycling
    recycle_k: int = 8
    # consensus
    consensus_k: int = 3
    consensus_len: int = 10
    consensus_alpha: float = 0.5
    consensus_tree: int = 0  # 0: draft the best chain; > 0: a tree of this many nodes (best branches)
    consensus_fuzzy: int = 0  # > 0: when no exact k-gram match, accept token edit distance <= this
    # N-Grammys
    ngrammys_slots: int = 8
    ngrammys_len: int = 6

    def validate(self) -> "SpecConfig":
        check_method(self.method)
        if self.step_tokens is not None and self.step_tokens < 1:
            raise StandError(f"step_tokens must be >= 1, got {self.step_tokens}")
        if self.max_n < 1:
            raise StandError(f"max_n must be >= 1, got {self.max_n}")
        return self
