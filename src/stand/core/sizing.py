"""How many draft nodes each row of a verification pass gets: what a node is expected to earn against what it costs,
decided by one rule wherever stand drafts (our engine, and stand's proposers inside vLLM).

The worth rule. A pass expected to commit E tokens costs c; one more draft node adds dc to it and, accepted with
chance v, v tokens. The node raises the tokens per unit of time iff

    v >= dc * E / c                                                    (least_worth)

Our engine reads c from a cost grid measured on this machine (core/cost.py); vLLM's proposers from a step cost
they learn while serving (integrations/vllm/chains.py). Both keep nodes by this rule: `Sizer.budget` (the best m
nodes of a known acceptance curve, and the least worth a drafter may still add) and `keep_best_first` (chains,
token by token).

Acceptance curves. acc[m] is the expected tokens per step with a row's m best draft nodes (acc[0] = 1, the bonus
token). A drafter that knows its curve (STAND, from its calibrated tree's counts) hands it over; for any other the
Sizer learns one per group of rows (OnlineAcceptance: how often node i of its drafts lay on the accepted path).

Probes. A curve learnt online sees only the nodes it was offered, so a ProbeSchedule offers a larger draft every
EXPLORE_EVERY passes while drafts pay, and ever more rarely (the interval doubling up to EXPLORE_MAX) while they do
not: a drafter that cannot win here costs ever less, and one that starts to win is noticed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from stand.core.cost import CostGrid

EXPLORE_EVERY = 16  # passes between two probes while drafts pay
EXPLORE_MAX = 256  # ... and at most this many while they do not
ONLINE_NODES = 64  # most nodes an online curve covers
IDLE_ROWS = 16  # a drafter whose known curve pays in no pass of 1..IDLE_ROWS rows stays idle (Sizer.idle)


def least_worth(marginal: float, expected: float, cost: float) -> float:
    """The least acceptance chance at which one more node pays for itself: its marginal cost x the tokens the pass
    is expected to commit / the pass's cost (any unit of cost, the same for both)."""
    return marginal * expected / cost


def acceptance_curve(node_p: np.ndarray) -> np.ndarray:
    """[M+1] expected tokens per step with the m most likely of M nodes (m = 0..M; the bonus token included),
    from each node's chance of lying on the accepted path."""
    return 1.0 + np.concatenate([[0.0], np.cumsum(np.sort(np.asarray(node_p, dtype=np.float64))[::-1])])


def best_nodes(acc: np.ndarray, rows: int, costs: np.ndarray) -> int:
    """The m with the most expected tokens per ms: acc [M+1] expected tokens per step with m nodes; costs [K] ms of a
    pass of `rows` rows x (k + 1) tokens."""
    k = min(len(acc), len(costs))
    return int(np.argmax(rows * np.asarray(acc[:k]) / costs[:k]))


def nodes_per_row(acc: np.ndarray, rows: int, grid: CostGrid) -> int:
    """best_nodes with the costs read from a grid."""
    return best_nodes(acc, rows, np.array([grid(rows, k + 1) for k in range(len(acc))]))


def keep_best_first(values: list[np.ndarray], base: float, marginal: float, floor: float = 0.0) -> list[int]:
    """How many tokens of each row's chain to keep: values[i] [D_i] the chain's cumulative chances (never rising
    along it), base the step's cost without drafts, marginal one draft token's cost. Tokens join best first while
    each is worth at least `floor` and pays by the worth rule (the pass's expected tokens: one per row plus the
    values kept)."""
    order = sorted(((float(x), i) for i, v in enumerate(values) for x in v), reverse=True)
    keep = [0] * len(values)
    drafts, expected = 0, float(len(values))
    for v, i in order:
        if v < floor or v <= least_worth(marginal, expected, base + marginal * drafts):
            break
        keep[i] += 1
        drafts += 1
        expected += v
    return keep


class ProbeSchedule:
    """When a drafter sized by a learnt curve drafts more than the curve says pays, so the curve can learn: every
    `every` steps while drafts pay, backing off (the interval doubles, up to `most`) while they do not."""

    def __init__(self, every: int = EXPLORE_EVERY, most: int = EXPLORE_MAX):
        self.every, self.most = every, most
        self.interval = every  # steps between probes
        self.probe_step, self.next_probe = -1, 0

    def explores(self, now: int, paying: bool) -> bool:
        """Whether step `now` is a probe (every caller in the same step gets the same answer)."""
        if now == self.probe_step:
            return True
        if now < self.next_probe:
            return False
        self.interval = self.every if paying else min(2 * self.interval, self.most)
        self.probe_step, self.next_probe = now, now + self.interval
        return True


class OnlineAcceptance:
    """For a drafter without a known curve: how often its draft node i (in its own order) lay on the accepted path,
    counted from the steps verified so far, with a prior of one hit in two offers (optimistic at first)."""

    def __init__(self, size: int = ONLINE_NODES):
        self.offered = np.zeros(size)
        self.hits = np.zeros(size)
        self.probes = ProbeSchedule()

    def record(self, nodes: int, accepted: list[int]) -> None:
        """nodes: how many draft nodes the row was asked for (a drafter that delivers fewer, say no match, misses
        the rest: a pass costs its width whatever each row drafted); accepted: the accepted nodes' indices (root-0
        indexing, path order)."""
        self.offered[: min(nodes, len(self.offered))] += 1
        idx = np.asarray(accepted, dtype=np.int64) - 1
        self.hits[idx[idx < len(self.hits)]] += 1

    def curve(self) -> np.ndarray | None:
        """[M+1] expected tokens per step with the first m nodes (1 + the chances of nodes 0..m-1), M the most
        nodes ever offered; None before any tree was offered."""
        seen = int(np.count_nonzero(self.offered))
        if not seen:
            return None
        p = (self.hits[:seen] + 1.0) / (self.offered[:seen] + 2.0)
        return 1.0 + np.concatenate([[0.0], np.cumsum(p)])


class Budget(NamedTuple):
    nodes: int | None  # nodes asked of each row's drafter (None: its whole tree)
    floor: float  # least worth of a node in this pass (a drafter that estimates its nodes' chances may stop there)
    cap: int | None  # hard cap per row: the row's share of the pass's tokens (None: no cap)


class Sizer:
    """The engine's sizing of draft trees: for a pass of `rows` rows, how many nodes each row is asked for.

    grid: what a pass costs here (None: no cost model, every row gets the drafter's default or its share of
    step_tokens). curve: the drafter's known acceptance curve (None: learnt online per group). fixed: every row is
    asked for exactly this many nodes each pass (an equal budget for comparing drafters; no grid sizing).
    """

    def __init__(self, grid: CostGrid | None, curve: np.ndarray | None, default_nodes: int | None = None,
                 step_tokens: int | None = None, fixed: int | None = None):
        self.grid, self.curve, self.default_nodes = grid, curve, default_nodes
        self.step_tokens, self.fixed = step_tokens, fixed
        self._budgets: dict[int, Budget] = {}
        self._costs: dict[int, tuple[np.ndarray, int]] = {}  # rows -> (ms with k nodes per row [K], probe size)
        self.online: dict[int, OnlineAcceptance] | None = None  # group -> curve
        if grid is not None and curve is None and fixed is None:
            self.online = {}
        self.idle = self._never_drafts()

    def budget(self, rows: int) -> Budget:
        """The budget of every row in a pass of `rows` rows. With a known curve, m nodes such that rows * acc[m] /
        grid(rows, m + 1) is largest, and the floor least_worth(grid(rows, m + 2) - grid(rows, m + 1), acc[m],
        grid(rows, m + 1)): what one more node must be worth."""
        if rows not in self._budgets:
            cap = None if self.step_tokens is None else max(self.step_tokens // rows - 1, 0)
            nodes, floor = cap, 0.0
            if self.fixed is not None:
                nodes = self.fixed if cap is None else min(cap, self.fixed)
            elif self.grid is not None and self.curve is not None:
                acc = self.curve[: None if cap is None else cap + 1]
                nodes = nodes_per_row(acc, rows, self.grid)
                c = self.grid(rows, nodes + 1)
                floor = least_worth(self.grid(rows, nodes + 2) - c, float(acc[nodes]), c)
            elif self.default_nodes is not None:
                nodes = self.default_nodes if cap is None else min(cap, self.default_nodes)
            self._budgets[rows] = Budget(nodes, floor, cap)
        return self._budgets[rows]

    def ask(self, group: int, rows: int, now: int) -> tuple[Budget, int | None]:
        """(the pass's budget, the first m nodes of the row's draft its group's online curve says pay in pass `now`
        of `rows` rows; None when the drafter is not sized online)."""
        return self.budget(rows), None if self.online is None else self._online_nodes(group, rows, now)

    def learns(self, rows: int) -> bool:
        """Whether the drafter is told what a pass of `rows` rows verified: not when idle, nor when its known curve
        gives no row of such a pass a node (table updates that nothing drafted in this batch repays)."""
        if self.idle:
            return False
        return self.online is not None or self.grid is None or self.fixed is not None or self.budget(rows).nodes != 0

    def record(self, group: int, asked: int, accepted: list[int]) -> None:
        """A row of `group` was asked for `asked` nodes and these (root-0 indices) were accepted."""
        if self.online is not None:
            self.online.setdefault(group, OnlineAcceptance()).record(asked, accepted)

    def forget(self, groups: set[int]) -> None:
        """These groups have no row left: their learnt curves go."""
        if self.online is not None:
            for g in groups:
                self.online.pop(g, None)

    def best_live(self, n: int) -> int:
        """How many of a question's n samples to decode at once (a divisor of n: 1 is sequential, n batched) for the
        most expected tokens per ms: k rows with m nodes each bring k * acc[m] tokens in grid(k, m + 1) ms (a drafter
        without a known curve counts as plain decoding). Without a grid: all n."""
        if self.grid is None:
            return n

        def rate(k: int) -> float:
            m = 0 if self.curve is None else min(self.budget(k).nodes or 0, len(self.curve) - 1)
            return k * (1.0 if self.curve is None else float(self.curve[m])) / self.grid(k, m + 1)

        return max((k for k in range(1, n + 1) if n % k == 0), key=rate)

    def _never_drafts(self) -> bool:
        """A known curve for which no pass of up to IDLE_ROWS rows pays on this grid: the drafter never drafts here,
        and then learns nothing either (it costs what plain decoding costs)."""
        if self.grid is None or self.curve is None or self.fixed is not None:
            return False
        return all(self.budget(rows).nodes == 0 for rows in range(1, IDLE_ROWS + 1))

    def _online_nodes(self, group: int, rows: int, now: int) -> int:
        """The nodes the group's online curve says pay in a pass of `rows` rows. Before any evidence, and in the
        group's probe passes, a probe: the most nodes whose pass costs at most twice a plain one (at least one)."""
        if rows not in self._costs:
            costs = np.array([self.grid(rows, k + 1) for k in range(ONLINE_NODES + 1)])  # [K] ms, k nodes per row
            self._costs[rows] = costs, max(int(np.searchsorted(costs, 2 * costs[0], side="right")) - 1, 1)
        costs, probe = self._costs[rows]
        stats = self.online.get(group)
        acc = None if stats is None else stats.curve()
        if acc is None:
            return probe
        m = best_nodes(acc, rows, costs)
        return probe if stats.probes.explores(now, paying=m > 0) else m
