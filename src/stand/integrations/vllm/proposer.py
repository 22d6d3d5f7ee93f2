"""vLLM's `custom_class` proposer contract, once for every stand proposer.

What vLLM 0.32 does with a custom proposer (read from vllm/v1/spec_decode/custom_class_proposer.py and
vllm/v1/worker/gpu_model_runner.py): it builds `Class(vllm_config)` in the worker, calls `load_model(model)` once
(on CPU), and after every step, once the step's tokens are booked, calls

    propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]

sampled_token_ids: [B] the tokens each batch row committed this step (empty: none, e.g. a prefill chunk);
num_tokens_no_spec: [>=B] the tokens each row holds, this step's included; token_ids_cpu: [>=B, max_model_len]
those tokens (prompt, then output). The answer is one draft chain per row (empty: no draft), at most
num_speculative_tokens long. vLLM verifies chains with its rejection sampler and, given no draft probabilities,
treats each draft token as deterministic (one-hot q): accept with the target's p(x), else resample from p with x
removed, the rule stand's verifier applies to deterministic drafts (docs/design.md, "Lossless verification"). Any chain is therefore
exact; a chain only has to be likely to be accepted to pay.

propose() gets token ids only: no request ids, no logits. Rows are recognised by content (rows.py), and drafters
learn from the tokens vLLM committed (the STAND proposer can also read the target's distributions through the model
vLLM hands load_model(): target_dists.py). Chains are cut to what a step can afford (chains.py). A proposer's knobs
come as JSON in the environment variable STAND_VLLM_OPTIONS.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from dataclasses import dataclass

import numpy as np

from stand.core.drafter import Drafter, parse_options
from stand.core.sequence import Row
from stand.core.tree import DraftTree
from stand.core.verify import Verdict
from stand.errors import StandError
from stand.core.sizing import ProbeSchedule
from stand.integrations.vllm.chains import ChanceBins, StepCost, select
from stand.integrations.vllm.rows import RowTracker, Step

ENV_OPTIONS = "STAND_VLLM_OPTIONS"
LIVE: "weakref.WeakSet[ChainProposer]" = weakref.WeakSet()  # proposers of this process (worker.py reads their stats)


@dataclass
class ProposerStats:
    calls: int = 0
    drafts: int = 0  # rows given a non-empty chain
    drafted: int = 0  # draft tokens proposed
    seconds: float = 0.0  # inside propose


@dataclass
class Limits:
    k: int  # num_speculative_tokens: the longest chain
    max_len: int  # max_model_len: a chain never runs past it
    vocab_size: int
    model: str  # the target's path (drafters that build tables from the model read it)


def limits(vllm_config) -> Limits:
    spec, model = vllm_config.speculative_config, vllm_config.model_config
    return Limits(int(spec.num_speculative_tokens), int(model.max_model_len), int(model.get_vocab_size()),
                  str(model.model))


def env_options(options_class: type, method: str):
    """The proposer's options dataclass from STAND_VLLM_OPTIONS (a JSON object; absent: the defaults)."""
    text = os.environ.get(ENV_OPTIONS, "").strip()
    try:
        given = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise StandError(f"{ENV_OPTIONS} is not JSON: {e}") from None
    if not isinstance(given, dict):
        raise StandError(f"{ENV_OPTIONS} must be a JSON object, got {text!r}")
    return parse_options(options_class, given, method)


def committed_step(new: list[int]) -> tuple[DraftTree, Verdict]:
    """The tokens a row committed in one step, as a drafter's observe() sees a step: a chain of the accepted ones
    and the last as the bonus token."""
    return DraftTree.chain(new[:-1]), Verdict(list(range(1, len(new))), new[-1])


def first_path(tree: DraftTree, k: int) -> list[int]:
    """The chain that takes every node's first child (a drafter's most likely path), at most k tokens."""
    kids, node, out = tree.children(), 0, []
    while kids[node] and len(out) < k:
        node = kids[node][0]
        out.append(tree.tokens[node - 1])
    return out


@dataclass
class Chain:
    tokens: list[int]  # [D] the draft
    values: np.ndarray  # [D] cumulative calibrated chance that the row commits each token from the draft
    estimates: np.ndarray  # [D] the drafter's own estimate per token (what the calibration maps)


@dataclass
class ChainOptions:
    """Knobs every stand proposer has (each proposer's options add its drafter's)."""

    min_prob: float = 0.1  # a draft token whose calibrated chance of being committed is lower is never proposed
    cost_aware: bool = True  # size chains by the learnt cost of a vLLM step (else by min_prob alone)

    def __post_init__(self):
        if not 0.0 <= self.min_prob <= 1.0:
            raise StandError(f"min_prob must be in [0, 1], got {self.min_prob}")


class ChainProposer:
    """A stand drafter behind vLLM's custom_class interface: rows followed by content, one chain per row, chains
    sized by calibrated chances of acceptance against the learnt cost of a step (chains.py)."""

    method = "none"
    Options: type = ChainOptions

    def __init__(self, vllm_config):
        self.limits = limits(vllm_config)
        self.options = env_options(self.Options, self.method)
        self.tracker = RowTracker()
        self.drafter = self.make_drafter()
        self.stats = ProposerStats()
        self.calibration, self.cost = ChanceBins(), StepCost()
        self.probes = ProbeSchedule()  # steps that propose the chains above min_prob whole: fresh data for both
        self.pending: dict[int, Chain] = {}  # row uid -> the chain it was last given
        self.step_tokens: int | None = None  # draft tokens of the step the last call scheduled (None: not decode only)
        self.step_start = 0.0  # when that step began (the last call's end)
        LIVE.add(self)

    def make_drafter(self) -> Drafter:
        raise NotImplementedError

    def load_model(self, *args, **kwargs) -> None:
        """Model-free: nothing to load (vLLM calls this once with the target)."""

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        t = time.perf_counter()
        steps, gone = self.tracker.step(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        if self.step_tokens is not None and all(s is not None and not s.fresh for s in steps):
            self.cost.add(len(steps), self.step_tokens, t - self.step_start)
        for row in gone:
            self.pending.pop(row.uid, None)
            self.drafter.finish(row)
        self.prepare(steps)
        for s in steps:
            if s is not None:
                self._learn(s)
        self.flush()
        chains = [None if s is None else self._candidate(s.row) for s in steps]
        out = self._cut(steps, chains)
        self.step_tokens = sum(map(len, out)) if all(s is not None for s in steps) else None
        self.step_start = time.perf_counter()
        self._count(out, self.step_start - t)
        return out

    def _learn(self, s: Step) -> None:
        """The row's new tokens: the fate of the chain it was given (calibration), the drafter's observation."""
        if s.fresh:
            self.start(s.row)
        last = self.pending.pop(s.row.uid, None)
        if last is not None and last.tokens:
            self.calibration.update(last.estimates, accepted_prefix(last.tokens, s.new))
        self.observe(s.row, s.new, [] if last is None else last.tokens)
        self.tracker.commit(s.row, s.new)

    def _candidate(self, row: Row) -> Chain:
        """The row's next chain at full length, with its values."""
        room = min(self.limits.k, self.limits.max_len - len(row.tokens) - 1)
        tokens, estimates = self.chain(row, room) if room > 0 else ([], [])
        estimates = np.asarray(estimates, dtype=np.float64)
        return Chain(list(tokens), np.cumprod(self.calibration.chances(estimates)), estimates)

    def _cut(self, steps: list[Step | None], chains: list[Chain | None]) -> list[list[int]]:
        """Each row's chain cut to the length select() keeps; remembered per row for the next step's calibration."""
        live = [c for c in chains if c is not None]
        values = [c.values for c in live]
        cost = self.cost.per_step(len(live)) if self.options.cost_aware else None
        kept = select(values, cost, self.options.min_prob)
        if cost is not None and self.probes.explores(self.stats.calls, paying=sum(kept) > 0):
            kept = select(values, None, self.options.min_prob)  # a probe: every chain whole above min_prob
        keep = iter(kept)
        out = []
        for s, c in zip(steps, chains):
            if c is None:
                out.append([])
                continue
            k = next(keep)
            self.pending[s.row.uid] = Chain(c.tokens[:k], c.values[:k], c.estimates[:k])
            out.append(c.tokens[:k])
        return out

    def _count(self, out: list[list[int]], seconds: float) -> None:
        st = self.stats
        st.calls += 1
        st.drafts += sum(1 for c in out if c)
        st.drafted += sum(map(len, out))
        st.seconds += seconds

    # ---- what a proposer may change -------------------------------------------------------------

    def prepare(self, steps: list[Step | None]) -> None:
        """A step's rows are known and the drafts they were given (self.pending) not yet settled."""

    def flush(self) -> None:
        """Every row of the step has been observed; the next chains are drafted after this."""

    def start(self, row: Row) -> None:
        """A row first seen (its prompt known, this step's tokens not yet observed)."""
        self.drafter.start(row, None)

    def observe(self, row: Row, new: list[int], draft: list[int]) -> None:
        """The tokens the row committed this step, after the draft it was given (row.tokens holds neither)."""
        tree, verdict = committed_step(new)
        self.drafter.observe(row, tree, None, verdict)

    def chain(self, row: Row, k: int) -> tuple[list[int], list[float]]:
        """The draft for the row's next step (at most k tokens) and the drafter's estimate for each token in
        [0, 1] (here: none, 1.0 each; the calibration learns what a token at each depth is worth)."""
        tokens = first_path(self.drafter.propose(row, k), k)
        return tokens, [1.0] * len(tokens)


def accepted_prefix(draft: list[int], new: list[int]) -> int:
    """Draft tokens vLLM accepted: the committed tokens start with them (a rejected one is resampled unequal)."""
    n = 0
    while n < len(draft) and n < len(new) and draft[n] == new[n]:
        n += 1
    return n
