"""Equal budgets (SpecConfig.nodes): every tree drafter drafts the asked nodes, each row counts what it drafted, and
the bench reports it beside tokens per step; bench rows with a drafter's own options."""

import pytest

from stand.core.sequence import Row
from stand.drafters.registry import make_drafter
from stand.engine import Engine
from stand.errors import StandError
from stand.lab.bench import BenchConfig, bench, with_options
from stand.params import SamplingParams, SpecConfig

TEXT = "the cat sat on the mat. the cat sat on the hat. the cat sat on the mat. the cat"


def _warm_row(tiny, method: str, nodes: int | None, **options):
    """A drafter whose row has seen a repetitive prompt, and that row."""
    spec = SpecConfig(method=method, nodes=nodes, step_tokens=None, cost_grid="off", options=options,
                      share_across_prompts=True)  # STAND's table outlives the row
    d = make_drafter(spec, tiny.vocab_size)
    row = Row(tiny.encode(TEXT), SamplingParams(max_new_tokens=64))
    Engine(tiny, d, None).run([row])  # the drafter learns from a whole decode
    d.start(row, None)
    return d, row


@pytest.mark.parametrize("method", ["stand", "stand-heuristic", "stand-dynamic", "recycle"])
@pytest.mark.parametrize("nodes", [8, 40])
def test_tree_drafters_draft_the_asked_nodes(tiny, method, nodes):
    d, row = _warm_row(tiny, method, nodes)
    tree = d.propose(row, nodes)
    assert 0 < len(tree) <= nodes
    assert len(tree) > min(nodes, 24) // 2  # a warm table fills most of it (a node without a match drops its subtree)
    own, own_row = _warm_row(tiny, method, None)
    assert len(own.propose(own_row, nodes)) <= nodes  # without an equal budget max_nodes still caps


def test_stand_grows_past_its_template_only_where_it_can():
    d = make_drafter(SpecConfig(method="stand-heuristic", nodes=60), 300)
    assert sum(map(len, d._cut(60))) == 60  # the hand-made tree grows by its prior
    kept = make_drafter(SpecConfig(method="stand", nodes=60), 300)  # no calibrated tree for this vocabulary
    assert sum(map(len, kept._cut(60))) == len(kept.template) == 24  # no counts to grow by: its whole tree


def test_chains_draft_up_to_the_asked_tokens(tiny):
    d, row = _warm_row(tiny, "pld", 30)
    assert 10 < len(d.propose(row, 30)) <= 30  # more than its own 10 tokens
    own, own_row = _warm_row(tiny, "pld", None)
    assert len(own.propose(own_row, 30)) <= 10


def test_rows_count_the_nodes_they_drafted(tiny):
    prompt = tiny.encode(TEXT)
    spec = SpecConfig(method="recycle", nodes=12, step_tokens=None, cost_grid="off")
    rows = [Row(prompt, SamplingParams(0.8, max_new_tokens=40, seed=1), group=0, index=i) for i in range(2)]
    Engine(tiny, make_drafter(spec, tiny.vocab_size), None).run(rows)
    for r in rows:
        assert 0 < r.stats.drafted <= 12 * r.stats.steps
        assert r.stats.as_dict()["nodes_per_step"] == pytest.approx(r.stats.drafted / r.stats.steps)
    none = Row(prompt, SamplingParams(max_new_tokens=10))
    Engine(tiny, make_drafter(SpecConfig(method="none"), tiny.vocab_size)).run([none])
    assert none.stats.drafted == 0


def test_bench_reports_nodes_per_step_and_variant_rows(tiny):
    spec = SpecConfig(cost_grid="off", nodes=16, step_tokens=None)
    cfg = BenchConfig(["pld", "stand", "stand[stochastic=false;max_n=2]"], "champ", 1, 1,
                      params=SamplingParams(0.6, max_new_tokens=24, seed=0), spec=spec, warmup=False)
    rows = {r["method"]: r for r in bench(tiny, cfg)}
    assert set(rows) == {"pld", "stand", "stand[stochastic=false;max_n=2]"}
    for r in rows.values():
        assert r["nodes"] == 16 and 0 <= r["nodes_per_step"] <= 16


def test_variant_options_parse_and_errors():
    assert with_options("stand") == ("stand", {})
    assert with_options("stand[recency=0.5;stochastic=false;x=abc]") == \
        ("stand", {"recency": 0.5, "stochastic": False, "x": "abc"})
    with pytest.raises(StandError, match="key=value"):
        with_options("stand[recency]")
    with pytest.raises(StandError, match="brackets"):
        with_options("stand[recency=1")
    with pytest.raises(StandError, match="anchor"):
        BenchConfig(["hf[k=1]"]).validate()
    with pytest.raises(StandError, match="unknown method"):
        BenchConfig(["fast[k=1]"]).validate()


def test_nodes_flag_lifts_the_pass_cap():
    from stand.cli.common import speculation

    spec = speculation("stand", nodes=24)
    assert spec.nodes == 24 and spec.step_tokens is None
    assert speculation("stand").step_tokens == SpecConfig().step_tokens
