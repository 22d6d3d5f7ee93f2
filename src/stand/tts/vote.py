"""Choosing one answer from N samples: majority vote over normalised answers, or best-of-N by a score."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from stand.api import Sample
from stand.tts.answers import answer_key


@dataclass
class Vote:
    answer: str | None  # the winning answer, as the first sample that gave it wrote it; None: no sample answered
    key: str | None  # its normalised key
    votes: float  # an int when unweighted
    share: float  # votes / number of samples, or / total weight (samples without an answer count in the denominator)
    counts: dict[str, float]  # key -> votes
    first: int | None  # index of the first sample that gave the winning answer


def majority_vote(answers: list[str | None], key: Callable[[str], str] | None = None,
                  weights: list[float] | None = None) -> Vote:
    """The most frequent answer key (key: the normaliser, default answer_key). Samples without an answer do not vote.
    weights: each sample's vote (default 1 each); votes, share and counts are then sums of weights.

    Tie-break (deterministic): among the keys with the most votes, the one given first, i.e. by the
    sample with the lowest index.
    """
    counts: dict[str, float] = {}
    first: dict[str, int] = {}
    raw: dict[str, str] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        k = (key or answer_key)(a)
        counts[k] = counts.get(k, 0) + (1 if weights is None else weights[i])
        first.setdefault(k, i)
        raw.setdefault(k, a)
    if not counts:
        return Vote(None, None, 0, 0.0, {}, None)
    best = min(counts, key=lambda k: (-counts[k], first[k]))
    total = len(answers) if weights is None else sum(weights)
    return Vote(raw[best], best, counts[best], counts[best] / total if total > 0 else 0.0, counts, first[best])


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


def score_weights(scores: list[float]) -> list[float]:
    """Votes weighted by score: exp(score - best score), so a score read as a log-probability (or log-odds) weighs
    as that probability relative to the best; a -inf score weighs 0 (every score -inf: 1 each)."""
    top = max(scores, default=float("-inf"))
    if top == float("-inf"):
        return [1.0] * len(scores)
    return [math.exp(s - top) for s in scores]
