"""What a verification pass costs on this machine: a grid of milliseconds by rows and tokens per row, read as the
engine runs a pass (padded to a cheaper, wider shape where the backend can). Measured per machine by
backends/machine.py, or stored with a calibrated tree; core/sizing.py weighs it against what draft nodes earn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stand.core.files import read_json, write_json
from stand.errors import StandError

GRID_FORMAT = "stand-cost-grid"
GRID_ROWS = (1, 2, 4, 8, 16)
GRID_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
GRID_MAX_TOKENS = 160  # largest pass measured (rows x tokens per row)


def interpolate(points: dict[int, float], x: float) -> float:
    """Linear between measured points {size: ms}, flat below the first, extended from the last two (never downward:
    a last point that dipped says nothing about sizes beyond it)."""
    xs = np.array(sorted(points), dtype=np.float64)
    ys = np.array([points[int(k)] for k in xs])
    if x <= xs[-1] or len(xs) < 2:
        return float(np.interp(x, xs, ys))
    slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
    return float(ys[-1] + slope * (x - xs[-1]))


def suffix_argmin(ms: np.ndarray) -> np.ndarray:
    """[K] -> [K] index of the least value at or after each position (the smallest such index on ties)."""
    out = np.empty(len(ms), dtype=np.int64)
    best = len(ms) - 1
    for i in range(len(ms) - 1, -1, -1):
        if ms[i] <= ms[best]:
            best = i
        out[i] = best
    return out


@dataclass
class CostGrid:
    """ms of one forward as measured: rows -> {tokens per row -> ms}.

    The budget reads it through `grid(rows, tokens)`, the cost a pass of that shape has *as the engine runs it*,
    and the engine runs a pass at `pad_to(rows, tokens)` tokens per row. pads: whether the backend can widen a
    pass with padding positions whose logits are dropped (backends/protocol.py). With padding, a pass of t tokens
    costs the least measured cost of any width t' >= t and runs at that width: on some CPUs a wider pass is faster
    (the matrix-product library picks its kernels by shape; docs/results.md, pass shapes on torch). Without it, the measured
    curve is read non-decreasing (a dip is timing noise the engine cannot use).
    """

    ms: dict[int, dict[int, float]]
    meta: dict = field(default_factory=dict)
    pads: bool = False
    _curves: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # rows -> (ms [K], width [K])

    def __post_init__(self):
        if not self.ms or any(not row for row in self.ms.values()):
            raise StandError("a cost grid needs at least one measured size per row count")

    def with_padding(self, pads: bool) -> "CostGrid":
        """The same measurements read for a backend that pads (True) or does not (False)."""
        return self if pads == self.pads else CostGrid(self.ms, self.meta, pads)

    def measured(self, rows: int, tokens: float) -> float:
        """ms of `rows` rows of `tokens` tokens, interpolated between measured sizes and row counts; beyond the
        largest row count (Bm), the Bm-row curve at tokens * rows / Bm (the same number of tokens)."""
        bs = sorted(self.ms)
        if rows >= bs[-1]:
            return interpolate(self.ms[bs[-1]], tokens * rows / bs[-1])
        return float(np.interp(rows, np.array(bs, dtype=np.float64), [interpolate(self.ms[b], tokens) for b in bs]))

    def widest(self, rows: int) -> int:
        """The most tokens per row measured around `rows` rows (both neighbouring row counts measured it)."""
        bs = sorted(self.ms)
        top = {b: max(self.ms[b]) for b in bs}
        if rows >= bs[-1]:
            return max(int(top[bs[-1]] * bs[-1] / rows), 1)
        below = [b for b in bs if b <= rows] or bs[:1]
        return min(top[below[-1]], top[min(b for b in bs if b >= rows)])

    def curve(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(ms [K], width [K]): for k = 1..K tokens per row (index k - 1), the cost of the pass as run and the tokens
        per row it runs at; K = widest(rows)."""
        if rows not in self._curves:
            raw = np.array([self.measured(rows, k) for k in range(1, self.widest(rows) + 1)])  # [K]
            if self.pads:
                best = suffix_argmin(raw)
                self._curves[rows] = raw[best], best + 1
            else:
                self._curves[rows] = np.maximum.accumulate(raw), np.arange(1, len(raw) + 1)
        return self._curves[rows]

    def __call__(self, rows: int, tokens: float) -> float:
        """ms of a pass of `rows` rows with `tokens` tokens each, as the engine runs it (padded where that is
        cheaper); beyond the widest measured pass, the measured curve extended (never below the widest)."""
        ms, _ = self.curve(rows)
        if tokens <= len(ms):
            return float(np.interp(tokens, np.arange(1, len(ms) + 1, dtype=np.float64), ms))
        return max(float(ms[-1]), self.measured(rows, tokens))

    def pad_to(self, rows: int, tokens: int) -> int:
        """Tokens per row a pass of `rows` rows that needs `tokens` per row runs at: the cheapest width >= tokens
        (tokens itself without padding, or beyond the widest measured pass)."""
        _, width = self.curve(rows)
        return int(width[tokens - 1]) if 1 <= tokens <= len(width) else tokens

    def to_dict(self) -> dict:
        return {"format": GRID_FORMAT, "ms": {str(b): {str(t): v for t, v in sorted(c.items())}
                                              for b, c in sorted(self.ms.items())}, "meta": self.meta}

    @classmethod
    def from_dict(cls, doc: dict, source: str = "cost grid") -> "CostGrid":
        """A grid document, or a `stand profile --json` curve (one row only: {"ours": {"1": ms, ...}})."""
        try:
            if doc.get("format") == GRID_FORMAT:
                ms = {int(b): {int(t): float(v) for t, v in c.items()} for b, c in doc["ms"].items()}
                return cls(ms, dict(doc.get("meta", {})))
            curve = doc.get("ours") or doc.get("hf")
            return cls({1: {int(t): float(v) for t, v in curve.items()}}, {"from": "profile curve"})
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise StandError(f"{source} is not a cost grid or a `stand profile --json` curve: {e}") from e

    @classmethod
    def load(cls, path: str) -> "CostGrid":
        doc = read_json(path, "cost grid")
        if not isinstance(doc, dict):
            raise StandError(f"{path} is not a cost grid")
        return cls.from_dict(doc, path)

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())


def resolve_grid(path: str | None, drafter, measure=None) -> CostGrid | None:
    """The cost grid a run uses. path: "off" (none: fixed shares of a pass), "tree" (the grid stored with the
    drafter's calibrated tree: the machine it was calibrated on), a grid file, or None: this machine's grid,
    from `measure()` (measured once per machine and model, cached), or the tree's when there is no measure."""
    if path == "off":
        return None
    if path and path != "tree":
        return CostGrid.load(path)
    if path is None and measure is not None:
        return measure()
    doc = getattr(getattr(drafter, "template", None), "meta", {}).get("cost_grid")
    return CostGrid.from_dict(doc, "the tree's cost grid") if isinstance(doc, dict) else None
