"""A row: one sequence being generated (a prompt and one sample), its sampling state, its stats and its end.

A row ends on an end-of-sequence token (unless ignore_eos), at max_new_tokens, when its context is full,
on a stop string (the text is cut before it), when cancelled, or when decoding it failed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from stand.params import SamplingParams

_uids = itertools.count()


def mean_accepted(new_tokens: int, steps: int) -> float:
    """Tokens per verification pass (1.0 for plain decoding)."""
    return new_tokens / max(steps, 1)


def stop_index(text: str, stop: list[str]) -> int | None:
    """Character index of the first stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


@dataclass
class RowStats:
    new_tokens: int = 0
    steps: int = 0  # verification passes
    seconds: float = 0.0  # from the run's start to this row's end
    draft_seconds: float = 0.0  # in the drafter: propose + observe
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per step
    drafted: int = 0  # draft nodes verified, summed over the steps

    @property
    def mean_accepted(self) -> float:
        return mean_accepted(self.new_tokens, self.steps)

    @property
    def nodes_per_step(self) -> float:
        return self.drafted / max(self.steps, 1)

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "forward_passes": self.steps + 1, "steps": self.steps,
                "mean_accepted": self.mean_accepted, "drafted": self.drafted, "nodes_per_step": self.nodes_per_step,
                "seconds": self.seconds, "draft_seconds": self.draft_seconds}


@dataclass
class Row:
    prompt: list[int]
    params: SamplingParams
    group: int = 0  # rows of a group share drafter tables
    index: int = 0  # sample index within the group
    uid: int = field(default_factory=lambda: next(_uids))
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error" (then `error` says why)
    cancelled: bool = False
    text: str = ""
    stats: RowStats = field(default_factory=RowStats)
    logprobs: list[float] | None = None  # set to [] to record each generated token's log-prob under the model (T=1)
    started: float = 0.0  # perf_counter() when the row joined the batch
    error: str | None = None
    # a row that resumes its group's text (a tree-search beam): the prompt's first question_len tokens are the
    # group's question and the rest is text rows of the group generated before (None: the whole prompt is new)
    question_len: int | None = None
    continues: int | None = None  # uid of an ended row (of a held group) whose text this prompt extends: the engine
    # copies the cached tokens they share instead of computing them again

    def __post_init__(self):
        self.tokens = list(self.prompt)
        seed = self.params.seed
        self.rng = np.random.default_rng(None if seed is None else [seed, self.group, self.index])

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def resumes(self) -> bool:
        """The prompt continues text its group's drafter has seen (see question_len)."""
        return self.question_len is not None

    def group_key(self) -> tuple[int, int]:
        """(group, hash of the question): the rows of a group asking one question draft from each other."""
        return self.group, hash(tuple(self.prompt[: self.question_len]))

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def room(self, max_len: int) -> int:
        """Draft tokens this row can still take in one step (the bonus token is always added)."""
        return max(min(self.params.max_new_tokens - self.stats.new_tokens, max_len - len(self.tokens)) - 1, 0)

    def append(self, new: list[int], eos_ids: set[int], max_len: int, decode: Callable[[list[int]], str],
               drafted: int = 0) -> list[int]:
        """Appends one step's tokens up to the first end condition, as plain decoding (one token a step) would
        keep them; returns those kept. drafted: the draft nodes this step verified."""
        start = len(self.tokens)
        for tok in new:
            self.tokens.append(tok)
            if tok in eos_ids and not self.params.ignore_eos:
                self.finish_reason = "stop"
                break
            if len(self.tokens) - self.prompt_len >= self.params.max_new_tokens:
                self.finish_reason = "length"
                break
        if self.params.stop:
            self._cut_at_stop(start, decode)
        kept = self.tokens[start:]
        self.stats.steps += 1
        self.stats.drafted += drafted
        self.stats.new_tokens = len(self.tokens) - self.prompt_len
        self.stats.accept_lengths.append(len(kept))
        self.check_room(max_len)
        if self.cancelled and not self.done:
            self.finish_reason = "cancelled"
        return kept

    def _cut_at_stop(self, start: int, decode: Callable[[list[int]], str]) -> None:
        """If this step's tokens (from index `start`) bring a stop string, the row ends with the first of them
        whose text holds it (plain decoding checks after every token): the tokens after it are dropped."""
        if stop_index(decode(self.generated), self.params.stop) is None:
            return
        for end in range(start + 1, len(self.tokens) + 1):
            if stop_index(decode(self.tokens[self.prompt_len:end]), self.params.stop) is not None:
                del self.tokens[end:]
                self.finish_reason = "stop"
                return

    def fail(self, error: Exception) -> None:
        """The row ends because decoding it failed (the engine's rows beside it go on)."""
        self.finish_reason, self.error = "error", f"{type(error).__name__}: {error}"

    def check_room(self, max_len: int) -> None:
        if not self.done and len(self.tokens) >= max_len:
            self.finish_reason = "length"

    def final_text(self, decode: Callable[[list[int]], str]) -> str:
        """The generated text, cut before the first stop string."""
        text = decode(self.generated)
        cut = stop_index(text, self.params.stop) if self.params.stop else None
        return text if cut is None else text[:cut]


OnCommit = Callable[[Row, list[int]], None]
