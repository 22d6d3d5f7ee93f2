"""Consensus drafting: the DAG, its weights and drafts, the k-gram index, and lossless greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest

from stand.drafters.registry import make_drafter
from stand.drafters.consensus import (PROMPT, ConsensusDrafter, GroupIndex, best_path, best_tree, build_dag,
                                      edit_distance_many)
from stand.core.tree import DraftTree
from stand.core.sequence import Row
from stand.engine import Engine
from stand.params import SamplingParams, SpecConfig
from tiny import tiny_target

PATHS = [  # (tokens, the target's probability of each token when it was sampled)
    ([1, 2, 3], [0.9, 0.8, 0.7]),
    ([1, 2, 4], [0.5, 0.6, 0.4]),
    ([5, 2, 3], [0.2, 0.9, 0.9]),
]


def edge(dag, a, b):
    """Edge between the nodes (depth, token) a and b (a = None: the root)."""
    return (0 if a is None else dag.ids[a], dag.ids[b])


def test_dag_merges_equal_tokens_at_equal_depth():
    dag = build_dag(PATHS)
    assert sorted(dag.ids) == [(1, 1), (1, 5), (2, 2), (3, 3), (3, 4)]  # token 2 at depth 2 is one node
    assert dag.paths == 3
    assert dag.counts[edge(dag, (1, 1), (2, 2))] == 2
    assert dag.counts[edge(dag, (1, 5), (2, 2))] == 1
    assert dag.counts[edge(dag, (2, 2), (3, 3))] == 2  # reached from both 1 and 5


def test_edge_weights_follow_the_formula():
    dag = build_dag(PATHS)
    a = 0.3
    w = dag.weights(a)
    expect = {
        (None, (1, 1)): a * 0.7 + (1 - a) * 2 / 3,
        (None, (1, 5)): a * 0.2 + (1 - a) * 1 / 3,
        ((1, 1), (2, 2)): a * 0.7 + (1 - a) * 2 / 3,
        ((1, 5), (2, 2)): a * 0.9 + (1 - a) * 1 / 3,
        ((2, 2), (3, 3)): a * 0.8 + (1 - a) * 2 / 3,
        ((2, 2), (3, 4)): a * 0.4 + (1 - a) * 1 / 3,
    }
    assert len(w) == len(expect)
    for (u, v), val in expect.items():
        assert w[edge(dag, u, v)] == pytest.approx(val)


def test_best_path_and_tree():
    dag = build_dag(PATHS)
    assert best_path(dag, 0.5) == [1, 2, 3]
    # frequency only: the merged node makes 2 -> 3 (2 of 3) beat 2 -> 4
    assert best_path(dag, 0.0) == [1, 2, 3]
    # probability only: 5 (0.2) is too unlikely at the root; then 2 -> 3 (0.8) beats 2 -> 4 (0.4)
    assert best_path(build_dag(PATHS + [([7], [0.95])] * 1), 1.0) == [1, 2, 3]
    # a high-probability single token beats a long uncertain chain when it is more likely to be accepted
    assert best_path(build_dag([([8], [1.0])] * 3 + [([9, 9, 9, 9], [0.1] * 4)]), 0.5) == [8]
    # tree: products 1: .683, 1-2: .467, 1-2-3: .342, 5: .267
    tree = best_tree(dag, 0.5, 3)
    assert (tree.tokens, tree.parents) == ([1, 2, 3], [-1, 0, 1])
    tree = best_tree(dag, 0.5, 4)
    assert (tree.tokens, tree.parents) == ([1, 2, 3, 5], [-1, 0, 1, -1])
    assert all(q is None for q in tree.qs)


def test_path_through_merged_nodes_need_not_be_one_continuation():
    # no single continuation is [1, 2, 3], but the DAG joins 1 -> 2 and 2 -> 3 at the shared node (2, 2)
    paths = [([1, 2, 6], [0.9, 0.9, 0.1]), ([1, 2, 7], [0.9, 0.9, 0.1]), ([4, 2, 3], [0.3, 0.9, 0.9]),
             ([5, 2, 3], [0.3, 0.9, 0.9])]
    assert best_path(build_dag(paths), 0.5) == [1, 2, 3]


def test_index_is_incremental_and_spans_rows():
    g = GroupIndex(k=2)
    prompt = [10, 11, 12, 10, 11, 13]
    g.add_prompt(prompt, [1.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    g.add_row(0, prompt)
    g.add_row(1, prompt)
    assert g.matches(0, 8) == []  # (11, 13) has no continuation yet
    g.append(1, [10, 11, 14], [0.5, 0.6, 0.7])
    g.append(0, [10, 11], [0.9, 0.9])
    # row 0 ends in (10, 11): continued in row 1 (at 8), the prompt (at 5, then at 2), latest first;
    # row 0's own (10, 11) has no next token yet and is not indexed
    assert g.matches(0, 8) == [(1, 8), (PROMPT, 5), (PROMPT, 2)]
    assert g.matches(0, 2) == [(1, 8), (PROMPT, 5)]
    toks, probs = g.continuation(1, 8, 3)
    assert toks.tolist() == [14] and probs.tolist() == [0.7]
    toks, probs = g.continuation(PROMPT, 2, 3)
    assert toks.tolist() == [12, 10, 11] and probs.tolist() == [0.2, 0.3, 0.4]
    assert g.matches(1, 8) == []  # (11, 14): nowhere else
    g.append(0, [99, 11], [0.5, 0.5])
    assert g.matches(0, 8) == []  # (99, 11): no 2-gram match
    # backing off to (11,): after 11 in row 0 itself (99), row 1 (14), the prompt (13, 12); latest first
    assert g.matches(0, 8, min_n=1) == [(0, 8), (1, 8), (PROMPT, 5), (PROMPT, 2)]


def test_edit_distance_many_matches_a_reference():
    def ref(a, b):
        d = np.arange(len(b) + 1)
        for i, x in enumerate(a, 1):
            prev, d[0] = d.copy(), i
            for j, y in enumerate(b, 1):
                d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (x != y))
        return d[-1]

    rng = np.random.default_rng(0)
    for m in (2, 3, 4):
        q = rng.integers(0, 3, 3)
        w = rng.integers(0, 3, (50, m))
        assert edit_distance_many(q, w).tolist() == [ref(q.tolist(), x.tolist()) for x in w]


def test_fuzzy_match_finds_a_near_copy():
    g = GroupIndex(k=3)
    g.add_prompt([1])
    g.add_row(0, [1])
    g.add_row(1, [1])
    g.append(1, [20, 21, 22, 23, 24], [0.9] * 5)
    g.append(0, [20, 99, 22], [0.9] * 3)  # one substitution away from 20 21 22
    assert g.matches(0, 8) == []
    # 20 21 22 | 23 (a substitution); row 0's own 20 99 | 22 (a deletion); latest starts first
    assert g.fuzzy_matches(0, 1, 8) == [(1, 4), (0, 3)]
    assert g.fuzzy_matches(0, 1, 1) == [(1, 4)]
    assert g.fuzzy_matches(0, 0, 8) == []
    assert (1, 5) in g.fuzzy_matches(0, 2, 64)  # 20 21 22 23 | 24: a substitution and an insertion


def run(target, method, rows_params, prompt, n, **cfg):
    drafter = make_drafter(SpecConfig(method=method, options=cfg), target.vocab_size)
    rows = [Row(list(prompt), p, group=0, index=i) for i, p in enumerate(rows_params[:n])]
    return Engine(target, drafter).run(rows)


@pytest.mark.parametrize("cfg", [{}, {"nodes": 8}, {"fuzzy": 1, "k": 2}])
def test_greedy_consensus_equals_plain_greedy(cfg):
    target = tiny_target()
    prompt = target.encode("abcabc abc")
    params = [SamplingParams(max_new_tokens=40) for _ in range(3)]
    plain = run(target, "none", params, prompt, 3)
    cons = run(target, "consensus", params, prompt, 3, **cfg)
    for a, b in zip(plain, cons):
        assert a.tokens == b.tokens
    assert sum(r.stats.steps for r in cons) < sum(r.stats.steps for r in plain)  # drafts were accepted


def test_rows_of_a_group_draft_for_each_other():
    """A row that is behind gets the text of a row that is ahead as its draft."""
    target = tiny_target()
    drafter = ConsensusDrafter(SpecConfig(method="consensus", options={"k": 2}), target.vocab_size)
    prompt = [5, 6, 7]
    ahead, behind = Row(prompt, SamplingParams(), group=3), Row(prompt, SamplingParams(), group=3)
    other = Row([9, 6, 7], SamplingParams(), group=3)  # another question: not consulted
    for r in (ahead, behind, other):
        drafter.start(r, None)
    drafter.groups[(3, hash((5, 6, 7)))].append(ahead.uid, [8, 9, 10], [0.9, 0.9, 0.9])
    drafter.groups[(3, hash((9, 6, 7)))].append(other.uid, [1, 1, 1], [1.0, 1.0, 1.0])
    assert drafter.propose(behind).tokens == [8, 9, 10]
    drafter.finish(ahead)
    assert drafter.propose(behind).tokens == [8, 9, 10]  # a finished row still drafts
    drafter.finish(behind)
    assert (3, hash((5, 6, 7))) not in drafter.groups  # the group is dropped when all its rows are done


def test_graft_adds_only_new_paths():
    from stand.drafters.combined import GRAFT
    from stand.core.tree import SparseDist, graft

    q = SparseDist([1, 2, 3], [0.5, 0.3, 0.2])
    base = DraftTree()
    a = base.add(1, -1, q, 0)
    base.add(2, -1, q, 1)
    base.add(5, a, None, 2)
    tree, added = graft(base, DraftTree.chain([1, 5, 7, 8]), GRAFT)  # follows 1 -> 5, then adds 7 -> 8
    assert added == 2
    assert tree.tokens == [1, 2, 5, 7, 8] and tree.parents == [-1, -1, 0, 2, 3]
    assert tree.tags[3:] == [GRAFT, GRAFT] and tree.qs[3] is None and tree.qs[0] is q
    assert base.tokens == [1, 2, 5]  # base untouched
    tree, added = graft(base, DraftTree.chain([3, 1]), GRAFT)  # diverges at the root: a new root child, last
    assert added == 2 and tree.tokens == [1, 2, 5, 3, 1] and tree.parents == [-1, -1, 0, -1, 3]
    assert graft(base, DraftTree.chain([1, 5]), GRAFT)[1] == 0  # nothing new


def test_greedy_stand_consensus_equals_plain_greedy():
    target = tiny_target()
    prompt = target.encode("abcabc abc")
    params = [SamplingParams(max_new_tokens=40) for _ in range(3)]
    plain = run(target, "none", params, prompt, 3)
    both = run(target, "stand+consensus", params, prompt, 3)
    for a, b in zip(plain, both):
        assert a.tokens == b.tokens
    assert sum(r.stats.steps for r in both) < sum(r.stats.steps for r in plain)


REAL_PROMPTS = ["What is 17 * 23? Think step by step.", "Write a Python function that reverses a string."]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["consensus", "stand+consensus"])
def test_real_model_greedy_equals_plain(real_f32, method):
    """2 prompts x 64 tokens, N=4 rows per prompt in one batch: every row equals plain greedy."""
    prompts = [real_f32.encode(p) for p in REAL_PROMPTS]
    def rows():
        return [Row(list(p), SamplingParams(max_new_tokens=64), group=g, index=i)
                for g, p in enumerate(prompts) for i in range(4)]
    plain = Engine(real_f32, make_drafter(SpecConfig(method="none"), real_f32.vocab_size)).run(
        [Row(list(p), SamplingParams(max_new_tokens=64), group=g) for g, p in enumerate(prompts)])
    spec = Engine(real_f32, make_drafter(SpecConfig(method=method), real_f32.vocab_size, real_f32)).run(rows())
    for r in spec:
        assert r.tokens == plain[r.group].tokens


def test_options_are_the_drafters_own():
    """Each drafter reads its own knobs; the combined drafter takes the union of its parts' knobs."""
    from stand.errors import StandError

    drafter = make_drafter(SpecConfig(method="stand+consensus", options={"k": 2, "max_n": 3}), 50)
    assert drafter.consensus.options.k == 2 and drafter.stand.options.max_n == 3
    assert drafter.options.k == 2 and drafter.options.topk == drafter.stand.options.topk
    with pytest.raises(StandError, match="'consensus'.*'max_n'|'max_n'.*'consensus'"):
        make_drafter(SpecConfig(method="consensus", options={"max_n": 3}), 50)
    with pytest.raises(StandError, match="'alpha'"):
        make_drafter(SpecConfig(method="consensus", options={"alpha": "high"}), 50)
    assert make_drafter(SpecConfig(method="consensus", options={"alpha": 1}), 50).options.alpha == 1
    with pytest.raises(StandError, match="'none'"):
        make_drafter(SpecConfig(method="none", options={"k": 1}), 50)


def test_stand_consensus_keeps_to_the_asked_nodes():
    """Under a budget the chain takes up to half and STAND the rest: never more nodes than the pass asked, none
    when it asks for none; without a budget both draft their own sizes."""
    drafter = make_drafter(SpecConfig(method="stand+consensus"), 50)
    asked = []

    def stand(row, max_nodes=None, min_value=0.0):
        asked.append(("stand", max_nodes))
        return DraftTree.chain(list(range(10, 10 + (6 if max_nodes is None else max_nodes))))

    def consensus(row, max_nodes=None, min_value=0.0):
        asked.append(("consensus", max_nodes))
        return DraftTree.chain([1, 2, 3, 4, 5][: 5 if max_nodes is None else max_nodes])

    drafter.stand.propose, drafter.consensus.propose = stand, consensus
    for budget in (0, 1, 2, 5, 8):
        asked.clear()
        tree = drafter.propose(None, budget)
        assert len(tree) == budget, (budget, asked)
        assert ("stand", budget - budget // 2 if budget > 1 else budget) in asked
    asked.clear()
    assert len(drafter.propose(None)) == 11 and asked == [("consensus", None), ("stand", None)]
