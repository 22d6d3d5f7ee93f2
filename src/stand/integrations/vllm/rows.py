"""vLLM's batch rows as stand Rows, followed from step to step.

A custom proposer gets the token ids of every row of vLLM's batch (prompt and committed output, one row of a
[max_rows, max_len] array each, `lengths[i]` of them valid) and the tokens each row committed this step. vLLM does
not say which request a row belongs to, and rows move when requests leave (the batch is condensed). So a row is
recognised by its content: the tracked row at the same index whose tokens it extends, else any other tracked row it
extends (one that moved), else it is new, and its prompt is what it held before this step's tokens. Rows with equal
prompts form a group (the n samples of one request, or requests that repeat a prompt): what stand's drafters share.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from stand.core.sequence import Row
from stand.params import SamplingParams

CHECK_TAIL = 16  # committed tokens compared when a row is matched (with the whole prompt)


@dataclass
class Tracked:
    row: Row
    prompt: bytes  # the prompt's int32 bytes: rows are matched on it
    missed: int = 0  # consecutive steps the row was not in the batch


@dataclass
class Step:
    """One batch row this step: its stand Row and the tokens it committed since the proposer last saw it."""

    row: Row
    new: list[int]
    fresh: bool  # the row was first seen now (its group may be new too)


@dataclass
class RowTracker:
    forget_after: int = 8  # steps a row may be absent from the batch before it counts as finished
    live: dict[int, Tracked] = field(default_factory=dict)  # uid -> row
    at: dict[int, int] = field(default_factory=dict)  # batch index -> uid, as of the last step
    groups: dict[bytes, int] = field(default_factory=dict)  # prompt bytes -> group id
    members: dict[int, int] = field(default_factory=dict)  # group id -> rows started in it so far
    _ids: itertools.count = field(default_factory=itertools.count)

    def step(self, sampled: list[list[int]], lengths: np.ndarray, tokens: np.ndarray) -> tuple[list[Step | None], list[Row]]:
        """Per batch row (sampled [B], lengths [>=B], tokens [>=B, max_len]): a Step, or None where the row committed
        nothing (a prefill chunk, or not scheduled); and the rows that left the batch for good."""
        claimed: set[int] = set()
        out: list[Step | None] = []
        at: dict[int, int] = {}
        for i, got in enumerate(sampled):
            seq = np.asarray(tokens[i, : int(lengths[i])], dtype=np.int32)  # [L]
            item, fresh = self._match(i, seq, claimed), False
            if item is None and got:
                item, fresh = self._start(seq, len(got)), True
            if item is None:
                out.append(None)
                continue
            claimed.add(item.row.uid)
            at[i] = item.row.uid
            new = seq[len(item.row.tokens):].tolist()
            out.append(Step(item.row, new, fresh) if new else None)
        self.at = at
        return out, self._age(claimed)

    def commit(self, row: Row, new: list[int]) -> None:
        """The row now holds its new tokens (after the drafter has observed them)."""
        row.tokens.extend(new)
        row.stats.steps += 1

    def _match(self, i: int, seq: np.ndarray, claimed: set[int]) -> Tracked | None:
        """The tracked row that seq extends: the one last seen at index i first, then any unclaimed one."""
        here = self.live.get(self.at.get(i, -1))
        if here is not None and here.row.uid not in claimed and _extends(seq, here):
            return here
        return next((t for uid, t in self.live.items() if uid not in claimed and _extends(seq, t)), None)

    def _start(self, seq: np.ndarray, committed: int) -> Tracked:
        """A row first seen now; its prompt is what it held before this step's `committed` tokens."""
        prompt = seq[: len(seq) - committed]
        key = prompt.tobytes()
        group = self.groups.setdefault(key, next(self._ids))
        index = self.members.get(group, 0)
        self.members[group] = index + 1
        row = Row(prompt.tolist(), SamplingParams(seed=0), group=group, index=index)
        item = Tracked(row, key)
        self.live[row.uid] = item
        return item

    def _age(self, claimed: set[int]) -> list[Row]:
        """Counts a step of absence for every unclaimed row; returns (and forgets) those absent too long."""
        gone = []
        for uid, t in list(self.live.items()):
            t.missed = 0 if uid in claimed else t.missed + 1
            if t.missed > self.forget_after:
                gone.append(self.live.pop(uid).row)
                self._leave(t)
        return gone

    def _leave(self, t: Tracked) -> None:
        """A group whose rows have all left is forgotten (a later equal prompt starts a new group)."""
        group = t.row.group
        if not any(o.row.group == group for o in self.live.values()):
            self.groups.pop(t.prompt, None)
            self.members.pop(group, None)


def _extends(seq: np.ndarray, t: Tracked) -> bool:
    """seq starts with the tracked row's tokens: the whole prompt, and the last CHECK_TAIL committed tokens."""
    n, p = len(t.row.tokens), t.row.prompt_len
    if len(seq) < n or seq[:p].tobytes() != t.prompt:
        return False
    lo = max(p, n - CHECK_TAIL)
    return seq[lo:n].tolist() == t.row.tokens[lo:n]
