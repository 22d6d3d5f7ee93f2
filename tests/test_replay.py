"""The replay bench (stand.lab.replay): its expected acceptance is what the verifier accepts on average, and a
replay commits exactly the trace it is given."""

import numpy as np
import pytest

from stand.core import verify as V
from stand.lab.replay import (Replay, Variant, expected_accepted, follow, node_reach, one_hot_argmax, replay,
                              sample_traces)
from stand.params import SamplingParams
from test_verify import deterministic_tree, node_probs, stochastic_tree


def trees(make, seed: int, count: int):
    """`count` trees from `make` with the target's distributions at their nodes."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        tree = make(rng)
        yield tree, node_probs(tree)


@pytest.mark.parametrize("make", [stochastic_tree, deterministic_tree])
def test_expected_accepted_is_the_verifiers_mean(make):
    for tree, probs in trees(make, 7, 3):
        draws = [len(V.verify_sample(tree, probs, np.random.default_rng(s)).accepted) for s in range(6000)]
        mean, se = np.mean(draws), np.std(draws) / np.sqrt(len(draws))
        assert expected_accepted(tree, probs) == pytest.approx(mean, abs=4 * se + 1e-9)


def test_node_reach_is_each_nodes_acceptance_frequency():
    """Per node, not only summed: the chance each node lies on the accepted path is how often the verifier accepts it
    (the counts a calibration by replay adds up)."""
    rng = np.random.default_rng(11)
    tree = stochastic_tree(rng)
    probs = node_probs(tree)
    reach = node_reach(tree, probs)
    seen = np.zeros(len(tree))
    n = 6000
    for s in range(n):
        for node in V.verify_sample(tree, probs, np.random.default_rng(s)).accepted:
            seen[node - 1] += 1
    se = np.sqrt(reach * (1 - reach) / n)
    assert reach.shape == (len(tree),) and (np.abs(seen / n - reach) <= 4 * se + 2e-3).all()
    kids = tree.children()
    for node, below in enumerate(kids):  # a child is accepted only with its parent
        assert all(reach[c - 1] <= (reach[node - 1] if node else 1.0) + 1e-12 for c in below)


@pytest.mark.parametrize("make", [stochastic_tree, deterministic_tree])
def test_greedy_reach_is_the_greedy_verifiers_path(make):
    for tree, probs in trees(make, 5, 5):
        accepted = V.verify_greedy(tree, probs.argmax(-1).tolist()).accepted
        reach = node_reach(tree, one_hot_argmax(probs))
        assert np.flatnonzero(reach).tolist() == [a - 1 for a in accepted] and set(reach.tolist()) <= {0.0, 1.0}


def test_greedy_replay_scores_what_a_greedy_run_accepts(tiny):
    """At T=0 the drafts are deterministic and the trace is greedy decoding's, so a replay scores, step by step, the
    tokens a real run with the same drafter commits (the last step aside: a real run cuts it at the length)."""
    from stand.drafters.registry import make_drafter
    from stand.core.sequence import Row
    from stand.engine import Engine
    from stand.params import SpecConfig

    params = SamplingParams(0.0, max_new_tokens=40, ignore_eos=True, seed=0)
    prompt = tiny.encode("the cat sat on the mat. the cat sat on the")
    trace = sample_traces(tiny, [prompt], params)[0]
    spec = SpecConfig(method="stand", nodes=8, cost_grid="off").validate()
    real = Engine(tiny, make_drafter(spec, tiny.vocab_size, tiny)).run([Row(prompt, params)])[0]
    assert real.tokens == trace  # greedy with drafts is greedy
    row = Row(prompt, params)
    engine = Replay(tiny, make_drafter(spec, tiny.vocab_size, tiny), {row.uid: trace})
    engine.run([row])
    scores = [a for a, _ in engine.scores[row.uid]]
    assert len(scores) == real.stats.steps and max(real.stats.accept_lengths) > 1
    assert scores[:-1] == pytest.approx(real.stats.accept_lengths[:-1])


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
        assert (r["empty_steps"] == 1.0) if variant == "none:0" else (0.0 <= r["empty_steps"] < 1.0)
        if variant == "none:0":
            assert r["expected_A"] == 1.0 and r["steps"] == sum(len(t) - len(p) for p, t in zip(prompts, traces))


def test_shared_schedules_replay_every_trace_of_a_question(tiny):
    """Two questions x 3 samples: alone, sequential and batched all commit every trace (replay asserts it) and score
    one step per committed pass; a question's rows share one drafter table only in the shared schedules."""
    params = SamplingParams(0.8, max_new_tokens=24, seed=3)
    prompts = [tiny.encode("the cat sat on the mat. the cat"), tiny.encode("one two three, one two")]
    traces = sample_traces(tiny, prompts, params, samples=3)
    assert len(traces) == 6 and all(t[: len(prompts[i // 3])] == prompts[i // 3] for i, t in enumerate(traces))
    assert traces[0] != traces[1] or traces[1] != traces[2]  # three draws of one question, not one text thrice
    pairs = [(prompts[i // 3], t) for i, t in enumerate(traces)]
    for schedule in ("alone", "sequential", "batched"):
        r = replay(tiny, pairs, Variant.parse("stand:8"), params, samples=3, schedule=schedule)
        assert r["schedule"] == schedule and len(r["per_trace"]) == 6 and r["expected_A"] >= 1.0
    with pytest.raises(ValueError, match="schedule"):
        replay(tiny, pairs, Variant.parse("stand:8"), params, samples=3, schedule="together")


def test_one_after_another_drafts_from_the_first_trace(tiny):
    """One text replayed twice: in sequence the second replay drafts from the table the first filled, alone it
    starts cold; the first replay is the same in both."""
    params = SamplingParams(0.8, max_new_tokens=40, seed=3)
    prompt = tiny.encode("the cat sat on the mat. the cat")
    trace = sample_traces(tiny, [prompt], params)[0]
    alone, seq = (replay(tiny, [(prompt, trace)] * 2, Variant.parse("stand:8"), params, samples=2, schedule=s)
                  ["per_trace"] for s in ("alone", "sequential"))
    assert seq[0] == pytest.approx(alone[0]) and seq[1] > alone[1] + 0.1
