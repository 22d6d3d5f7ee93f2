"""How long each row's chain is: calibrated chances of acceptance against what a vLLM step costs, both learnt online,
weighed by stand's worth rule (core/sizing.py).

A drafter's estimate for a draft token (STAND: the table's probability of the token, discounted for contexts seen
few times; consensus: the DAG edge's weight) is not a probability of acceptance. `ChanceBins` maps it to one: per
bin of estimates, the share of the drafted tokens that vLLM accepted when it verified them (a token counts once the
tokens before it in its chain were accepted). A chain's value at depth d is the product of the calibrated chances of
its first d tokens: the chance that the row commits that token from the draft.

`StepCost` learns the wall time of a vLLM step against its rows and its draft tokens, from the time between the end
of one propose call and the start of the next, on steps that only decoded: seconds ~ a + c * rows + b * drafts. With
it, `select` keeps draft tokens best first by the worth rule (sizing.keep_best_first). Without a fit yet (the first
steps, or when every step had the same size) it keeps tokens of value >= a floor, which also keeps the cost model
supplied with steps of several sizes.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from stand.core.sizing import keep_best_first

BINS = 10  # estimate bins over [0, 1]
PRIOR = 8.0  # pseudo-trials per bin at the bin's centre scaled by the overall accepted/estimated ratio
TIMES_PER_SIZE = 16  # step times kept per token count (the median is used)
REFIT = 8  # steps between two fits of the cost line


@dataclass
class ChanceBins:
    hits: np.ndarray = field(default_factory=lambda: np.zeros(BINS))
    trials: np.ndarray = field(default_factory=lambda: np.zeros(BINS))

    @staticmethod
    def bins(estimates) -> np.ndarray:
        return np.minimum((np.asarray(estimates, dtype=np.float64) * BINS).astype(np.int64), BINS - 1)

    def chances(self, estimates) -> np.ndarray:
        """[D] calibrated chance of acceptance of each estimate: the bin's accepted share, pulled towards the bin's
        centre times the ratio of all accepted tokens to all estimates (so a bin with little data, or one that
        went quiet after a few misses, follows the others instead of locking at zero)."""
        b = self.bins(estimates)
        centres = (np.arange(BINS) + 0.5) / BINS
        ratio = (self.hits.sum() + PRIOR) / (self.trials @ centres + PRIOR)
        prior = np.minimum(centres[b] * ratio, 1.0)
        return np.minimum((self.hits[b] + PRIOR * prior) / (self.trials[b] + PRIOR), 0.999)

    def update(self, estimates, accepted: int) -> None:
        """A chain with these estimates [D] was verified and its first `accepted` tokens were accepted."""
        b = self.bins(estimates)[: accepted + 1]  # tokens reached: the accepted ones and the first rejected
        np.add.at(self.trials, b, 1.0)
        np.add.at(self.hits, b[:accepted], 1.0)


@dataclass
class StepCost:
    """seconds ~ a + c * rows + b * drafts: a step's rows (each samples, is booked, is drafted for) and its draft
    tokens (each verified) cost differently, so both are fitted (least squares through the median time of each
    (rows, drafts) cell seen, weighted by its samples)."""

    times: dict[tuple[int, int], deque] = field(default_factory=dict)  # (rows, drafts) -> recent wall times (s)
    added: int = 0  # steps recorded since the last fit
    line: tuple[float, float, float] | None = None  # (a, c, b)

    def add(self, rows: int, drafts: int, seconds: float) -> None:
        self.times.setdefault((rows, drafts), deque(maxlen=TIMES_PER_SIZE)).append(seconds)
        self.added += 1

    def fit(self) -> tuple[float, float, float] | None:
        """(a, c, b), refitted once REFIT steps have come in since the last fit; None until cells of several draft
        counts have been seen."""
        if self.added >= REFIT or (self.line is None and self.added):
            self.line, self.added = self._fit(), 0
        return self.line

    def _fit(self) -> tuple[float, float, float] | None:
        cells = sorted(self.times)
        if len({d for _, d in cells}) < 2:
            return None
        x = np.array([[1.0, r, d] for r, d in cells])  # [C, 3]
        y = np.array([statistics.median(self.times[c]) for c in cells])  # [C]
        w = np.sqrt([len(self.times[c]) for c in cells])  # [C]
        (a, c, b), *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        return float(a), float(c), max(float(b), 1e-6)

    def per_step(self, rows: int) -> tuple[float, float] | None:
        """(cost of a step of `rows` rows without drafts, cost of one draft token), from the fit."""
        line = self.fit()
        if line is None:
            return None
        a, c, b = line
        return max(a + c * rows, b), b


def select(values: list[np.ndarray], cost: tuple[float, float] | None, floor: float) -> list[int]:
    """How many tokens of each row's chain to keep: values[i] [D_i] are the chain's cumulative values (never rising
    along the chain). With a cost (the step's cost without drafts, one draft token's), best first by the worth rule;
    else those >= floor."""
    if cost is None:
        return [int(np.sum(v >= floor)) for v in values]
    return keep_best_first(values, *cost, floor)
