import json

import numpy as np
import pytest

from stand.core.cost import CostGrid, interpolate
from stand.lab.calibrate import CalibrateConfig, calibrate, choose_m, expected_accepted, recount, save, top_m
from stand.drafters.stand import StandDrafter
from stand.errors import StandError
from stand.params import SpecConfig
from stand.drafters.templates import TreeTemplate, heuristic, large_template

TEXTS = ["the cat sat on the mat. the cat sat on the hat.", "one two three, one two three, one two"]


def test_large_template_shape():
    t = large_template()
    assert len(t) == 600 and t.depth >= 16
    kids = t.children()
    assert all([t.ranks[c] for c in k] == list(range(len(k))) for k in kids)


def test_top_m_is_connected_and_prefers_parents():
    t = heuristic(6)  # parents (-1, -1, 0, 0, 1, 2)
    hits = np.array([9, 3, 3, 1, 0, 0])
    sub, old = top_m(t, hits, 4)
    assert len(sub) == 4 and sorted(old) == [0, 1, 2, 3]
    with pytest.raises(StandError):
        top_m(t, np.array([0, 1, 5, 0, 0, 0]), 2)  # a child counted above its parent


def test_choose_m_trades_acceptance_for_cost():
    hits = np.array([80, 40, 20, 10, 0, 0])
    flat = {1: 10.0, 64: 10.0}
    m, curve = choose_m(hits, 100, flat, 0.0, 6)
    assert m == 4 and curve["accepted"][3] == pytest.approx(2.5)
    steep = {1: 10.0, 2: 30.0, 64: 650.0}  # anything beyond one node costs more than it brings
    assert choose_m(hits, 100, steep, 0.0, 6)[0] == 1
    assert expected_accepted(hits, 100, 2).tolist() == pytest.approx([1.0, 1.8, 2.2])
    assert interpolate({1: 10.0, 2: 12.0}, 4) == pytest.approx(16.0)


def test_calibration_on_tiny_model(tiny, tmp_path):
    prompts = [tiny.encode(t) for t in TEXTS]
    # T=0.3: at 0.8 the random model's near-flat distributions leave 0-1 accepted nodes in 80 tokens (too few to test)
    cfg = CalibrateConfig(problems=2, max_new_tokens=40, template_size=120, max_m=60, temperature=0.3, keep=30)
    cost = {1: 10.0, 2: 10.5, 4: 11.0, 8: 12.0, 16: 14.0, 32: 20.0, 64: 32.0}
    grid = CostGrid({1: cost, 4: {1: 12.0, 2: 14.0, 4: 30.0}})
    cal = calibrate(tiny, prompts, cfg, grid=grid)
    assert cal.steps > 0 and cal.hits.sum() > 0
    M, K = cal.m, len(cal.tree)
    assert K == max(M, cfg.keep)  # the file keeps more nodes than M, with their counts
    out, plot = tmp_path / "tree.json", tmp_path / "tree.png"
    meta = save(cal, tiny, cfg, str(out), str(plot))
    assert plot.stat().st_size > 1000
    counts = meta["hits"]
    assert len(counts) == K and len(meta["template_hits"]) == 120
    for j, p in enumerate(cal.tree.parents):  # connected, and counts never grow from parent to child
        assert p < j
        if p >= 0:
            assert counts[p] >= counts[j]
    loaded = TreeTemplate.load(str(out))
    assert loaded == cal.tree and loaded.meta["m"] == M and loaded.meta["vocab_size"] == tiny.vocab_size
    doc = json.loads(out.read_text())
    assert doc["provenance"]["cost_ms"]["64"] == 32.0 and doc["size"] == K
    assert CostGrid.from_dict(doc["provenance"]["cost_grid"]).ms == grid.ms  # the engine sizes batches by it
    d = StandDrafter(SpecConfig(method="stand", tree=str(out)), tiny.vocab_size)
    assert d.template == cal.tree and d.default_nodes is None  # without a grid: the whole kept tree
    assert sum(map(len, d._cut(K + 10))) == K + 10  # an equal budget beyond it: grown from the template's counts
    kept = [c for kids in d._cut(M) for c in kids]  # asked for M: exactly the M best nodes
    assert len(kept) == M and all(cal.tree.parents[c] < 0 or cal.tree.parents[c] in kept for c in kept)
    assert sorted(kept) == sorted(np.argsort(-np.array(counts), kind="stable")[:M].tolist())
    acc = d.acceptance_curve()  # from the kept counts: what choose_m expected for M nodes
    assert len(acc) == K + 1 and acc[M] == pytest.approx(meta["expected_accepted"])
    twice, cfg2 = recount([str(out), str(out)], grid)  # the counts of two runs added up: the same curve
    assert twice.steps == 2 * cal.steps and (twice.hits == 2 * cal.hits).all() and twice.m == M
    assert cfg2.problems == 4 and len(cfg2.parts) == 2


def test_second_stage_counts_the_first_stage_tree_anew(tiny, tmp_path):
    prompts = [tiny.encode(t) for t in TEXTS]
    grid = CostGrid({1: {1: 10.0, 8: 11.0, 64: 30.0}})
    first = CalibrateConfig(problems=2, max_new_tokens=40, template_size=120, max_m=60, temperature=0.8, keep=30)
    path1 = str(tmp_path / "first.json")
    meta1 = save(calibrate(tiny, prompts, first, grid=grid), tiny, first, path1)
    second = CalibrateConfig(problems=2, max_new_tokens=40, max_m=60, temperature=0.8, keep=12, seed=5, tree=path1)
    cal = calibrate(tiny, prompts, second.validate(), grid=grid)
    assert len(cal.template) == 30 and len(cal.hits) == 30 and len(cal.tree) == 12  # the first tree's nodes, ranked anew
    path2 = str(tmp_path / "second.json")
    meta = save(cal, tiny, second, path2)
    _, old = top_m(cal.template, cal.hits, 12)
    assert meta["hits"] == [int(cal.hits[j]) for j in old] and meta["steps"] == cal.steps
    assert meta["template_hits"] == meta1["template_hits"] and meta["first_stage"]["tree"] == path1
    d = StandDrafter(SpecConfig(method="stand", tree=path2), tiny.vocab_size)
    assert sum(map(len, d._cut(40))) == 40  # beyond the tree: grown from the first stage's large-template counts
    with pytest.raises(StandError, match="second stage"):
        recount([path2], grid)
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(StandError, match="not a stand tree"):
        CalibrateConfig(tree=str(tmp_path / "t.json")).validate()


def test_calibration_by_replay_counts_expected_acceptance(tiny, tmp_path):
    """--traces: the large template's nodes counted by their exact chance of acceptance on fixed texts; the counts
    add up to the replay's expected tokens per step, and the kept tree is ranked by them."""
    from stand.lab.calibrate import replay_counts
    from stand.lab.replay import Variant, replay, sample_traces
    from stand.params import SamplingParams

    prompts = [tiny.encode(t) for t in TEXTS]
    params = SamplingParams(0.8, max_new_tokens=40, seed=0)
    traces = sample_traces(tiny, prompts, params)
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(traces))
    cfg = CalibrateConfig(problems=2, max_new_tokens=40, template_size=120, max_m=60, temperature=0.8, keep=30,
                          method="stand[recency=1]", traces=str(path)).validate()
    grid = CostGrid({1: {1: 10.0, 8: 11.0, 64: 30.0}})
    cal = calibrate(tiny, prompts, cfg, grid=grid)
    template = large_template(120)
    counted = Variant("stand[recency=1;refill=false]", 120)  # counting drafts the template as it is
    again = replay(tiny, list(zip(prompts, traces)), counted, params, template=template)
    assert cal.steps == again["steps"] and cal.hits.sum() > 0
    assert 1 + cal.hits.sum() / cal.steps == pytest.approx(again["expected_A"])  # the drafter's draws are seeded alike
    meta = save(cal, tiny, cfg, str(tmp_path / "tree.json"))
    assert meta["config"]["traces"] == str(path) and any(not float(h).is_integer() for h in meta["template_hits"])
    hits, steps, _ = replay_counts(tiny, prompts, template, cfg)
    assert steps == cal.steps and np.allclose(hits, cal.hits)
    with pytest.raises(StandError, match="method"):
        CalibrateConfig(method="recycle").validate()
    with pytest.raises(StandError, match="traces"):
        CalibrateConfig(traces=str(tmp_path / "none.json")).validate()


def test_tree_for_another_vocabulary_warns(tmp_path):
    path = tmp_path / "t.json"
    heuristic(8).to_json(str(path), {"model": "other", "vocab_size": 123})
    with pytest.warns(UserWarning, match="other"):
        StandDrafter(SpecConfig(method="stand", tree=str(path)), 456)


def test_bad_tree_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"format": "nope"}')
    with pytest.raises(StandError, match="not a stand tree"):
        TreeTemplate.load(str(path))
