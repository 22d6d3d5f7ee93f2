"""The replay bench (stand.lab.replay): its expected acceptance is what the verifier accepts on average, and a
replay commits exactly the trace it is given."""

import numpy as np
import pytest

from stand.core import verify as V
from stand.lab.replay import Variant, expected_accepted, follow, replay, sample_traces
from stand.params import SamplingParams
from test_verify import deterministic_tree, node_probs, stochastic_tree


@pytest.mark.parametrize("make", [stochastic_tree, deterministic_tree])
def test_expected_accepted_is_the_verifiers_mean(make):
    rng = np.random.default_rng(7)
    for _ in range(3):
        tree = make(rng)
        probs = node_probs(tree)
        draws = [len(V.verify_sample(tree, probs, np.random.default_rng(s)).accepted) for s in range(6000)]
        mean, se = np.mean(draws), np.std(draws) / np.sqrt(len(draws))
        assert expected_accepted(tree, probs) == pytest.approx(mean, abs=4 * se + 1e-9)


def test_follow_walks_the_tree_along_the_tokens():
    tree = deterministic_tree(None)  # 2 -> 1 -> 5, and 4
    assert follow(tree, [2, 1, 5, 3]) == [1, 3, 4] and follow(tree, [4, 2]) == [2] and follow(tree, [3]) == []


def test_replay_commits_the_trace(tiny):
    params = SamplingParams(0.8, max_new_tokens=30, seed=1)
    prompts = [tiny.encode("the cat sat on the mat. the cat"), tiny.encode("one two three, one two")]
    traces = sample_traces(tiny, prompts, params)
    assert all(t[: len(p)] == p and len(t) > len(p) for p, t in zip(prompts, traces))
    for variant in ("stand:8", "recycle:8", "none:0"):
        r = replay(tiny, list(zip(prompts, traces)), Variant.parse(variant), params)  # asserts each trace is committed
        assert r["steps"] > 0 and r["expected_A"] >= 1.0 and len(r["per_trace"]) == 2
        if variant == "none:0":
            assert r["expected_A"] == 1.0 and r["steps"] == sum(len(t) - len(p) for p, t in zip(prompts, traces))
