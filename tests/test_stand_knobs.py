"""STAND's ablation knobs: the table's update rule (running mean .. latest), what is inserted, the shortest back-off
order, a table per sample, sharpened draws; and trees grown from calibration counts."""

import numpy as np
import pytest
import torch

from stand.core.drafter import PromptDists
from stand.core.sequence import Row
from stand.core.tree import DraftTree
from stand.core.verify import Verdict
from stand.drafters.ngram_table import NGramTable, last_tail, merge_topk
from stand.drafters.draws import GumbelNoise, OwnFirst, draw
from stand.drafters.stand import StandDrafter
from stand.drafters.templates import DEEP_PRIOR, grown_tree, heuristic
from stand.errors import StandError
from stand.params import SamplingParams, SpecConfig


def test_recency_weights_the_latest_distribution():
    old_ids, old_p, count = np.array([[1, 2]]), np.array([[0.8, 0.2]]), np.array([3])
    new_ids, new_p = np.array([[2, 3]]), np.array([[0.6, 0.4]])
    mean = merge_topk(old_ids, old_p, count, new_ids, new_p, 3)  # (3 old + new) / 4
    assert dict(zip(*[x[0].tolist() for x in mean])) == pytest.approx({1: 0.6, 2: 0.3, 3: 0.1})
    half = merge_topk(old_ids, old_p, count, new_ids, new_p, 3, recency=0.5)
    assert dict(zip(*[x[0].tolist() for x in half])) == pytest.approx({1: 0.4, 2: 0.4, 3: 0.2})
    latest = merge_topk(old_ids, old_p, count, new_ids, new_p, 3, recency=1.0)
    assert latest[0][0].tolist() == [2, 3, -1] and latest[1][0, :2] == pytest.approx([0.6, 0.4])
    young = merge_topk(old_ids, old_p, np.array([0]), new_ids, new_p, 3, recency=0.25)  # 1/(c+1) = 1 wins
    assert young[0][0].tolist() == [2, 3, -1]
    with pytest.raises(StandError, match="recency"):
        NGramTable(recency=1.5)


def test_min_n_skips_shorter_contexts():
    t = NGramTable(max_n=2, topk=2, capacity=64)
    t.insert([[-1, 5]], [[7, 8]], [[0.6, 0.4]])  # key (5) only
    assert t.longest((9, 5))[1] == 1 and t.longest((9, 5), min_n=2) == (-1, 0)
    noise = GumbelNoise(np.random.default_rng(0))
    assert draw(t, (9, 5), noise, True) is not None and draw(t, (9, 5), noise, True, min_n=2) is None
    with pytest.raises(StandError, match="min_n"):
        StandDrafter(SpecConfig(method="stand", options={"min_n": 7}), 100)


def test_sharpened_draws_record_the_q_they_draw_from():
    t = NGramTable(max_n=1, topk=3, capacity=64)
    t.insert([[5]], [[1, 2, 3]], [[0.5, 0.3, 0.2]])
    d = draw(t, (5,), GumbelNoise(np.random.default_rng(0)), False, sharpen=2.0)
    want = np.array([0.25, 0.09, 0.04]) / 0.38
    assert d.dist.probs == pytest.approx(want) and d.dist.ids.tolist() == [1, 2, 3]


def _observed(learn_drafts: bool) -> NGramTable:
    d = StandDrafter(SpecConfig(method="stand", options={"max_n": 1, "learn_drafts": learn_drafts}), 100)
    row = Row([1, 2], SamplingParams())
    d.start(row, None)
    tree = DraftTree()
    tree.add(3)  # node 1: accepted
    tree.add(4)  # node 2: a rejected sibling
    probs = np.full((3, 100), 1e-4)
    probs[:, 50] = 0.9
    d.observe(row, tree, torch.tensor(probs), Verdict([1], 6))
    return d.table_for(row)


def test_learn_drafts_off_inserts_the_accepted_path_only():
    every, path = _observed(True), _observed(False)
    assert set(every.index) == {(2,), (3,), (4,)}  # the root and both drafted nodes
    assert set(path.index) == {(2,), (3,)}


def test_prompt_off_and_a_table_per_sample():
    d = StandDrafter(SpecConfig(method="stand", options={"shared": False, "prompt": False}), 100)
    rows = [Row([1, 2, 3], SamplingParams(), group=0, index=i) for i in range(2)]
    for r in rows:
        dists = PromptDists(np.array([[5], [6]]), np.array([[1.0], [1.0]]), np.ones(2))
        d.start(r, dists)
    assert d.table_for(rows[0]) is not d.table_for(rows[1]) and len(d.table_for(rows[0])) == 0
    for r in rows:
        d.finish(r)
    assert not d.tables


def test_grown_tree_follows_the_large_templates_counts():
    large = heuristic(40, DEEP_PRIOR)
    hits = (np.arange(40)[::-1] * 2).tolist()  # earlier nodes (parents first) counted more: connected
    meta = {"template_hits": hits, "large_template": {"size": 40, "prior": list(DEEP_PRIOR)}}
    grown = grown_tree(meta, 30)
    assert len(grown) == 30 and grown == large.subset(range(30))[0]
    assert grown_tree({"template_hits": hits[:10], "large_template": {"size": 40}}, 30) is None  # not that template
    assert grown_tree({}, 30) is None


def test_refill_spends_the_nodes_a_template_leaves_unfilled():
    """Token 9 has no entry, so the template's branch under it is lost; refill spends those nodes best-first elsewhere,
    after the template's nodes, which stay as they were drawn."""
    t = NGramTable(max_n=1, topk=3, capacity=64)
    t.insert([[1], [5], [6], [7]], [[5, 9, 6]] * 4, [[0.7, 0.2, 0.1]] * 4)
    t.insert([[6]], [[7, 5, 9]], [[0.5, 0.3, 0.2]])
    kids = heuristic(12).children()

    def drafted(refill: bool) -> DraftTree:
        d = StandDrafter(SpecConfig(method="stand", options={"max_n": 1, "refill": refill}), 100)
        return d.draft(t, np.array([1]), GumbelNoise(np.random.default_rng(7)), False, kids)

    plain, full = drafted(False), drafted(True)
    assert len(plain) < 12 and len(full) == 12
    assert full.tokens[: len(plain)] == plain.tokens and full.parents[: len(plain)] == plain.parents
    assert 9 in plain.tokens and not any(p >= 0 and full.tokens[p] == 9 for p in full.parents)  # 9's node stays a leaf
    for i, (p, q) in enumerate(zip(full.parents, full.qs)):  # every extra child was drawn from its parent's entry
        siblings = [full.tokens[j] for j in range(len(full)) if full.parents[j] == p]
        assert len(set(siblings)) == len(siblings) and q is not None and full.tokens[i] in q.ids.tolist()


def test_refill_is_the_default_but_a_counted_template_is_drafted_as_it_is():
    """Calibration counts a template's own nodes: count_template turns refill off, so every node is the template's."""
    t = NGramTable(max_n=1, topk=3, capacity=64)
    t.insert([[1], [5], [6], [7]], [[5, 9, 6]] * 4, [[0.7, 0.2, 0.1]] * 4)
    d = StandDrafter(SpecConfig(method="stand", options={"max_n": 1}), 100)
    template = heuristic(12)
    d.use_template(template)
    assert len(d.draft(t, np.array([1]), GumbelNoise(np.random.default_rng(7)), False)) == 12  # refilled
    d.count_template(template)
    counted = d.draft(t, np.array([1]), GumbelNoise(np.random.default_rng(7)), False)
    assert len(counted) < 12 and all(0 <= tag < len(template) for tag in counted.tags)


def test_own_first_prefers_the_samples_latest_and_falls_back_to_the_shared_table():
    own, shared = NGramTable(3, 4, 64, recency=1.0), NGramTable(3, 4, 64)
    ctx = np.array([[-1, 5, 6]])
    for table in (own, shared):  # the sample saw 5 6 -> 7, then 5 6 -> 8: its own table keeps the latest
        table.insert(ctx, np.array([[7]]), np.array([[1.0]]))
        table.insert(ctx, np.array([[8]]), np.array([[1.0]]))
    shared.insert(np.array([[4, 5, 6]]), np.array([[9]]), np.array([[1.0]]))  # a sibling's longer context
    view = OwnFirst(own, shared)
    slot, n = view.longest((-1, 5, 6))
    assert n == 2 and view.dist(slot)[0].tolist() == [8]  # a tie: the sample's own latest, not the mean (7 and 8)
    slot, n = view.longest((4, 5, 6))
    assert n == 3 and view.dist(slot)[0].tolist() == [9]  # the shared table's longer match
    assert view.longest((1, 2, 3)) == (-1, 0)


def test_own_latest_rows_keep_their_own_table_beside_the_shared_one(tiny):
    d = StandDrafter(SpecConfig(method="stand", options={"own_latest": True}), tiny.vocab_size)
    rows = [Row([1, 2, 3], SamplingParams(0.8, max_new_tokens=4, seed=s), group=0, index=s) for s in range(2)]
    for r in rows:
        d.start(r, None)
    a, b = (d.rows[r.uid].own for r in rows)
    assert a is not b and d.table_for(rows[0]) is d.table_for(rows[1])  # one shared table, an own table each
    assert isinstance(d.lookup_for(rows[0]), OwnFirst)


def test_own_table_is_the_default_and_takes_a_long_prompt_end_only(tiny):
    """A prompt with more keys than a row's own table holds fits: only its end goes in (the shared table has all)."""
    d = StandDrafter(SpecConfig(method="stand", options={"own_capacity": 64}), tiny.vocab_size)
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, tiny.vocab_size, 300)]
    ids = np.tile(np.array([[7, 8]]), (299, 1))  # [P-1, 2] after each prompt token but the last
    row = Row(prompt, SamplingParams(0.8, max_new_tokens=4, seed=0))
    d.start(row, PromptDists(ids, np.tile([[0.6, 0.4]], (299, 1)), np.ones(299)))
    own = d.rows[row.uid].own
    assert own is not None and 0 < len(own) <= 64 and own.evictions == 0
    n = d.options.max_n
    assert own.longest(prompt[-n - 1:-1])[1] == n and own.longest(prompt[:n])[1] < n  # its end, not its start
    assert d.table_for(row).longest(prompt[:n])[1] == n


def test_reserve_grows_the_chain_past_the_templates_depth_where_the_table_is_sure():
    """A loop (each token's successor near certain): the third of the budget kept out of the template is grown
    best-first down the sure chain, deeper than the template reaches; without reserve the template's shape stays."""

    def drafted(reserve: float) -> DraftTree:
        d = StandDrafter(SpecConfig(method="stand", options={"max_n": 1, "reserve": reserve, "own_latest": False}), 100)
        d.use_template(heuristic(24))
        row = Row([1, 2, 3], SamplingParams(0.0, max_new_tokens=8))
        d.start(row, None)
        ids = [[(t + j) % 100 for j in range(1, 11)] for t in range(100)]  # [100, 10] t -> t+1 first
        d.tables[d.rows[row.uid].table_key].insert([[t] for t in range(100)], ids, [[0.91] + [0.01] * 9] * 100)
        return d.propose(row, 24)

    plain, deep = drafted(0.0), drafted(1 / 3)
    assert len(plain) == len(deep) == 24
    assert plain.depths().max() == heuristic(24).depths().max() < deep.depths().max()
    with pytest.raises(StandError, match="reserve"):
        StandDrafter(SpecConfig(method="stand", options={"reserve": 1.0}), 100)


def test_default_keys_tell_apart_contexts_that_share_their_last_four_tokens(tiny):
    """Two siblings wrote different successors after contexts that differ only in their fifth-last token: with the
    default six-token keys a sample drafts the one its own context continues; four-token keys merge the two."""

    def draws(options: dict) -> list[int]:
        d = StandDrafter(SpecConfig(method="stand", options={"own_latest": False, **options}), tiny.vocab_size)
        row = Row([1, 2, 3], SamplingParams(0.0, max_new_tokens=4), group=0)
        d.start(row, None)
        n = d.options.max_n
        table = d.table_for(row)
        for fifth, nxt in ((10, 20), (11, 21)):
            table.insert([last_tail([9, fifth, 5, 6, 7, 8], n)], [[nxt]], [[1.0]])
        tail = tuple(last_tail([9, 10, 5, 6, 7, 8], n).tolist())
        return draw(d.lookup_for(row), tail, GumbelNoise(np.random.default_rng(0)), True).tokens.tolist()

    assert StandDrafter(SpecConfig(method="stand"), tiny.vocab_size).options.max_n == 6
    assert draws({}) == [20]
    assert sorted(draws({"max_n": 4})) == [20, 21]
