"""Choosing one answer from N samples: majority vote over normalised answers, or best-of-N by a score."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from stand.api import Sample
from stand.tts.answers import answer_key


@dataclass
class Vote:
    answer: str | None  # the winning answer, as the first sample that gave it wrote it; None: no sample answered
    key: str | None  # its normalised key
    votes: int
    share: float  # votes / number of samples (samples without an answer count in the denominator)
    counts: dict[str, int]  # key -> votes
    first: int | None  # index of the first sample that gave the winning answer


def majority_vote(answers: list[str | None], key: Callable[[str], str] | None = None) -> Vote:
    """The most frequent answer key (key: the normaliser, default answer_key). Samples without an answer do not vote.

    Tie-break (deterministic): among the keys with the most votes, the one given first, i.e. by the
    sample with the lowest index.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    raw: dict[str, str] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        k = (key or answer_key)(a)
        counts[k] = counts.get(k, 0) + 1
        first.setdefault(k, i)
        raw.setdefault(k, a)
    if not counts:
        return Vote(None, None, 0, 0.0, {}, None)
    best = min(counts, key=lambda k: (-counts[k], first[k]))
    return Vote(raw[best], best, counts[best], counts[best] / max(len(answers), 1), counts, first[best])


@dataclass
class ScoredSample(Sample):
    answer: str | None = None  # extracted final answer; None: none found
    key: str | None = None  # normalised answer
    score: float | None = None  # best-of-N score (higher is better)
    logprobs: list[float] = field(default_factory=list)  # per generated token, under the model at T=1


Scorer = Callable[[str, ScoredSample], float]  # (question, sample) -> score, higher is better


def mean_logprob(question: str, sample: ScoredSample) -> float:
    """The default best-of-N score: mean log-probability of the sample's tokens under the model (T=1)."""
    return sum(sample.logprobs) / len(sample.logprobs) if sample.logprobs else float("-inf")


def best_of_n(scores: list[float]) -> int:
    """Index of the highest score; ties go to the lowest index."""
    return min(range(len(scores)), key=lambda i: (-scores[i], i))
