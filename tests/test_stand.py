import logging

import numpy as np
import pytest

from stand.drafters.registry import make_drafter
from stand.drafters.stand import GumbelNoise, HeuristicStandDrafter, StandDrafter
from stand.core.sequence import Row
from stand.engine import Engine
from stand.drafters.ngram_table import NGramTable, last_tail
from stand.params import SamplingParams, SpecConfig
from stand.drafters.templates import TreeTemplate, heuristic

PROMPT_TEXT = "the cat sat on the mat. the cat sat on the hat. the cat"


def _drafter(template_pairs, **kw) -> StandDrafter:
    d = StandDrafter(SpecConfig(method="stand", options={"max_n": 2, "topk": 4, "capacity": 256, **kw}), 100)
    d.template = TreeTemplate.from_pairs(template_pairs)
    d.kids = d.template.children()
    return d


def _table():
    t = NGramTable(max_n=2, topk=4, capacity=256)
    t.insert([[-1, 5]], [[10, 11, 12, 13]], [[0.4, 0.3, 0.2, 0.1]])
    for tok in (10, 11, 12, 13):
        t.insert([[5, tok]], [[20 + tok, 40 + tok]], [[0.6, 0.3]])
    return t


def test_draft_records_exact_q_shared_by_siblings():
    d = _drafter([(-1, 0), (-1, 1), (-1, 2), (0, 0), (0, 1), (1, 0)])
    tree = d.draft(_table(), np.array([-1, 5]), GumbelNoise(np.random.default_rng(0)), deterministic=False)
    assert len(tree) == 6 and tree.parents == [-1, -1, -1, 0, 0, 1]
    q_root = tree.qs[0]
    assert tree.qs[1] is q_root and tree.qs[2] is q_root
    assert q_root.ids.tolist() == [10, 11, 12, 13] and q_root.probs == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert len(set(tree.tokens[:3])) == 3
    q_child = tree.qs[3]
    assert tree.qs[4] is q_child and q_child.probs == pytest.approx([2 / 3, 1 / 3])
    assert q_child.ids.tolist() == [20 + tree.tokens[0], 40 + tree.tokens[0]]  # the context includes the path
    assert tree.tags == [0, 1, 2, 3, 4, 5]


def test_deterministic_draft_takes_top_ranks_one_hot():
    d = _drafter([(-1, 0), (-1, 1), (0, 0)])
    tree = d.draft(_table(), np.array([-1, 5]), GumbelNoise(np.random.default_rng(0)), deterministic=True)
    assert tree.tokens == [10, 11, 30] and tree.qs == [None, None, None]


def test_no_match_drops_subtree():
    d = _drafter([(-1, 0), (0, 0), (1, 0)], refill=False)  # the template alone (refill: test_stand_knobs.py)
    tree = d.draft(_table(), np.array([-1, 7]), GumbelNoise(np.random.default_rng(0)), deterministic=False)
    assert len(tree) == 0
    tree = d.draft(_table(), np.array([-1, 5]), GumbelNoise(np.random.default_rng(0)), deterministic=False)
    assert len(tree) == 2  # depth 3 has no key (x, 20+y)


def test_gumbel_top_k_samples_without_replacement_from_q():
    d = _drafter([(-1, 0), (-1, 1)])
    table, noise = _table(), GumbelNoise(np.random.default_rng(1), block=64)  # small block: refreshed often
    n = 20000
    pairs = np.array([d.draft(table, np.array([-1, 5]), noise, False).tokens for _ in range(n)]) - 10
    q = np.array([0.4, 0.3, 0.2, 0.1])
    first = np.bincount(pairs[:, 0], minlength=4) / n
    assert first == pytest.approx(q, abs=0.015)
    for a in range(2):  # second draw given the first: q without it, renormalised
        sel = pairs[pairs[:, 0] == a, 1]
        want = np.where(np.arange(4) == a, 0, q) / (1 - q[a])
        assert np.bincount(sel, minlength=4) / len(sel) == pytest.approx(want, abs=0.02)


def test_noise_is_fresh_across_refills():
    noise = GumbelNoise(np.random.default_rng(0), block=8)
    draws = np.concatenate([noise.take(3) for _ in range(10)])
    assert len(np.unique(draws)) == len(draws)


@pytest.mark.parametrize("method,extra", [("stand", {}), ("stand", {"stochastic": False}), ("stand", {"max_n": 2}),
                                          ("stand-heuristic", {}), ("stand-dynamic", {}), ("recycle", {})])
def test_greedy_equals_plain(tiny, method, extra):
    prompt = tiny.encode(PROMPT_TEXT)
    params = SamplingParams(max_new_tokens=60)
    plain = Engine(tiny, make_drafter(SpecConfig(method="none"), tiny.vocab_size)).run([Row(prompt, params)])[0]
    rows = [Row(prompt, params, group=0, index=i) for i in range(2)]
    Engine(tiny, make_drafter(SpecConfig(method=method, options=extra), tiny.vocab_size)).run(rows)
    for r in rows:
        assert r.tokens == plain.tokens
    assert rows[0].stats.steps < plain.stats.steps  # it drafted something


def test_sampled_rows_reproducible_with_seed(tiny):
    prompt = tiny.encode(PROMPT_TEXT)
    outs = []
    for _ in range(2):
        d = make_drafter(SpecConfig(method="stand"), tiny.vocab_size)
        rows = [Row(prompt, SamplingParams(temperature=0.8, max_new_tokens=30, seed=3), group=0, index=i)
                for i in range(2)]
        Engine(tiny, d).run(rows)
        outs.append([r.tokens for r in rows])
    assert outs[0] == outs[1]


def test_tables_per_group_and_shared(tiny):
    prompt = tiny.encode(PROMPT_TEXT)
    params = SamplingParams(max_new_tokens=5)
    rows = [Row(prompt, params, group=g, index=i) for g in (0, 1) for i in range(2)]
    d = make_drafter(SpecConfig(method="stand"), tiny.vocab_size)
    for r in rows:
        d.start(r, None)
    assert len(d.tables) == 2
    assert d.table_for(rows[0]) is d.table_for(rows[1]) is not d.table_for(rows[2])
    for r in rows:
        d.finish(r)
    assert not d.tables and d.memory_bytes() > 0  # peak memory stays reported
    shared = make_drafter(SpecConfig(method="stand", share_across_prompts=True), tiny.vocab_size)
    for r in rows:
        shared.start(r, None)
    assert len(shared.tables) == 1


def test_heuristic_drafter_ignores_shipped_tree():
    d = HeuristicStandDrafter(SpecConfig(method="stand-heuristic"), 300)
    assert d.template == heuristic()


def test_persistent_table_warm_start_and_damage(tiny, tmp_path, caplog):
    prompt = tiny.encode(PROMPT_TEXT)
    path = tmp_path / "table.ngt"
    spec = SpecConfig(method="stand", table_path=str(path), options={"capacity": 4096})

    def run():
        d = make_drafter(spec, tiny.vocab_size)
        rows = [Row(prompt, SamplingParams(max_new_tokens=40))]
        Engine(tiny, d).run(rows)
        return d, rows[0]

    cold, cold_row = run()
    assert path.exists() and cold.table_error is None
    warm, warm_row = run()
    assert warm_row.tokens == cold_row.tokens and warm_row.stats.steps <= cold_row.stats.steps
    assert len(NGramTable.load(str(path))[0]) > 0

    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR):
        damaged, row = run()
    assert damaged.table_error and "checksum" in damaged.table_error
    assert row.tokens == cold_row.tokens  # the run went on with an empty table
    NGramTable.load(str(path))  # and saved a good table at the end


def test_saved_table_drafts_identically(tiny, tmp_path):
    prompt = tiny.encode(PROMPT_TEXT)
    d = make_drafter(SpecConfig(method="stand", share_across_prompts=True), tiny.vocab_size)
    row = Row(prompt, SamplingParams(max_new_tokens=30))
    Engine(tiny, d).run([row])
    path = str(tmp_path / "t.ngt")
    d.save_table(path)
    loaded, _ = NGramTable.load(path)
    tail = last_tail(row.tokens, d.options.max_n)
    a = d.draft(d.tables["shared"], tail, GumbelNoise(np.random.default_rng(5)), False)
    b = d.draft(loaded, tail, GumbelNoise(np.random.default_rng(5)), False)
    assert len(a) > 0 and a.tokens == b.tokens and a.parents == b.parents
    assert [q.probs.tolist() for q in a.qs] == [q.probs.tolist() for q in b.qs]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["stand", "stand-dynamic", "recycle"])
def test_greedy_equals_plain_real_model(real_f32, method):
    prompts = ["What is 17 * 23? Think step by step.", "Write a Python function that reverses a list.",
               "List the first ten prime numbers and explain why each is prime."]
    params = SamplingParams(max_new_tokens=128)
    for text in prompts:
        ids = real_f32.encode(text)
        plain = Engine(real_f32, make_drafter(SpecConfig(method="none"), real_f32.vocab_size)).run([Row(ids, params)])
        fast = Engine(real_f32, make_drafter(SpecConfig(method=method), real_f32.vocab_size)).run([Row(ids, params)])
        assert fast[0].tokens == plain[0].tokens, text
        assert fast[0].stats.steps < plain[0].stats.steps


def test_best_first_draft_follows_worth():
    """stand-dynamic: slots by worth v(parent) * q_rank, siblings in draw order, floor and cap respected."""
    from stand.drafters.stand import DynamicStandDrafter

    d = DynamicStandDrafter(SpecConfig(method="stand-dynamic", options={"max_n": 2, "topk": 4, "capacity": 256}), 100)
    noise = GumbelNoise(np.random.default_rng(0))
    tree = d.draft_best_first(_table(), np.array([-1, 5]), noise, True, cap=3, floor=0.0)
    # worths: 10 .4, 11 .3, 10->30 .4 * 2/3, then 12 and 11->31 at .2, ...: the three best, best first
    assert tree.tokens == [10, 11, 30] and tree.parents == [-1, -1, 0]
    assert all(q is None for q in tree.qs)  # deterministic: one-hot
    assert len(d.draft_best_first(_table(), np.array([-1, 5]), noise, True, cap=50, floor=0.0)) == 12
    tree = d.draft_best_first(_table(), np.array([-1, 5]), noise, True, cap=50, floor=0.28)
    assert tree.tokens == [10, 11]  # .267 and below are not worth the pass
    for _ in range(50):  # stochastic: the worth of a slot is fixed before the draw, so sizes do not depend on it
        tree = d.draft_best_first(_table(), np.array([-1, 5]), noise, False, cap=50, floor=0.21)
        assert len(tree) == 3 and tree.parents == [-1, -1, 0]
        assert tree.qs[0] is tree.qs[1] and tree.tokens[0] != tree.tokens[1]  # siblings share q, no repeats
