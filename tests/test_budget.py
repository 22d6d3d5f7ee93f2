"""Cost-aware tree sizes: the grid, the choice of nodes per row, the cut of a template to its best nodes."""

import numpy as np
import pytest

from stand.core.cost import CostGrid, resolve_grid
from stand.core.sizing import nodes_per_row
from stand.lab.profile import GridConfig, measure_grid
from stand.drafters.stand import StandDrafter, node_acceptance
from stand.core.sequence import Row
from stand.engine import Engine
from stand.errors import StandError
from stand.params import SamplingParams, SpecConfig
from stand.drafters.registry import make_drafter
from stand.drafters.templates import heuristic

ACC = np.array([1.0, 1.6, 2.0, 2.3, 2.5, 2.6, 2.65, 2.7])  # expected tokens per step with m nodes


def test_grid_interpolates_and_extends():
    g = CostGrid({1: {1: 10.0, 4: 16.0, 16: 40.0}, 4: {1: 14.0, 4: 40.0}})
    assert g(1, 2) == pytest.approx(12.0)
    assert g(1, 32) == pytest.approx(72.0)  # extended from the last two points
    assert g(2, 1) == pytest.approx(10.0 + 4 / 3)  # between the 1-row and 4-row curves
    assert g(8, 1) == pytest.approx(g(4, 2))  # beyond the largest row count: the same number of tokens


def test_nodes_per_row_follows_the_cost():
    flat = CostGrid({1: {1: 10.0, 64: 10.0}, 8: {1: 10.0, 8: 10.0}})
    assert nodes_per_row(ACC, 1, flat) == len(ACC) - 1  # free nodes: take them all
    steep = CostGrid({1: {1: 10.0, 2: 20.0, 8: 80.0}, 8: {1: 30.0, 2: 60.0, 8: 240.0}})
    assert nodes_per_row(ACC, 8, steep) == 0  # every node costs more than it brings: plain decoding
    cpu = CostGrid({1: {1: 50.0, 4: 70.0, 16: 100.0}, 8: {1: 100.0, 2: 150.0, 4: 250.0}})
    assert nodes_per_row(ACC, 1, cpu) > nodes_per_row(ACC, 8, cpu)  # a wide batch gets smaller trees


def test_grid_files(tmp_path):
    g = CostGrid({1: {1: 10.0, 2: 11.0}}, {"model": "m"})
    g.save(str(tmp_path / "g.json"))
    assert CostGrid.load(str(tmp_path / "g.json")).ms == g.ms
    (tmp_path / "p.json").write_text('{"ours": {"1": 5.0, "8": 9.0}, "hf": {"1": 7.0}}')  # `stand profile --json`
    assert CostGrid.load(str(tmp_path / "p.json")).ms == {1: {1: 5.0, 8: 9.0}}
    (tmp_path / "bad.json").write_text('[1, 2]')
    with pytest.raises(StandError, match="not a cost grid"):
        CostGrid.load(str(tmp_path / "bad.json"))
    assert resolve_grid("off", None) is None
    assert resolve_grid(str(tmp_path / "g.json"), None).ms == g.ms


def test_cut_keeps_the_most_valuable_connected_nodes(tiny):
    t = heuristic(24)
    d = StandDrafter(SpecConfig(method="stand"), tiny.vocab_size)
    d.use_template(t)
    p = node_acceptance(t)
    for m in (1, 3, 7, 12):
        kids = d._cut(m)
        kept = [c for k in kids for c in k]
        assert len(kept) == m
        assert all(t.parents[c] < 0 or t.parents[c] in kept for c in kept)  # connected
        assert sorted(p[kept])[0] >= sorted(p, reverse=True)[m - 1] - 1e-12  # the m best
    acc = d.acceptance_curve()
    assert acc[0] == 1.0 and np.all(np.diff(acc) >= 0) and len(acc) == 25


def test_engine_sizes_rows_by_the_grid(tiny):
    spec = SpecConfig(method="stand")
    d = StandDrafter(spec, tiny.vocab_size)
    cpu = CostGrid({1: {1: 50.0, 4: 60.0, 16: 90.0, 32: 150.0}, 8: {1: 100.0, 2: 180.0, 4: 340.0}})
    e = Engine(tiny, d, step_tokens=None, grid=cpu)
    assert e.sizer.budget(1)[0] > e.sizer.budget(8)[0]
    assert Engine(tiny, d, step_tokens=64).sizer.budget(8)[0] == 7  # no grid: the share of the pass
    prompt = tiny.encode("one two three, one two three, one two")
    rows = e.run([Row(prompt, SamplingParams(0.0, max_new_tokens=30), index=j) for j in range(8)])
    alone = Engine(tiny, StandDrafter(spec, tiny.vocab_size)).run([Row(prompt, SamplingParams(0.0, max_new_tokens=30))])
    assert all(r.generated == alone[0].generated for r in rows)  # greedy: same tokens whatever the tree size


def test_measure_grid_on_tiny(tiny):
    g = measure_grid(tiny, GridConfig(rows=(1, 2), tokens=(1, 4), reps=1, cache_len=16))
    assert set(g.ms) == {1, 2} and all(v > 0 for c in g.ms.values() for v in c.values())
    assert len(g.meta["reference_ms"]) == 2 and "busy" in g.meta


def test_noisy_grid_is_read_non_decreasing_without_padding():
    g = CostGrid({1: {1: 10.0, 2: 14.0, 3: 12.0, 4: 15.0}})  # a backend that cannot pad: a dip is noise
    assert g(1, 3) == pytest.approx(14.0) and g(1, 4) == pytest.approx(15.0) and g.pad_to(1, 2) == 2
    padded = g.with_padding(True)  # one that can: a pass of 2 runs as 3, at 3's cost
    assert padded(1, 2) == pytest.approx(12.0) and padded.pad_to(1, 2) == 3 and padded(1, 4) == pytest.approx(15.0)


def test_shipped_tree_is_calibrated_and_carries_its_grid():
    """The default model's vocabulary gets the shipped tree (M by default, the grid sizing batches); others the heuristic."""
    d = StandDrafter(SpecConfig(method="stand"), 49152)
    meta = d.template.meta
    assert meta["kind"] == "calibrated" and d.default_nodes == meta["m"] < len(d.template)
    grid = resolve_grid("tree", d)
    assert grid is not None and 1 in grid.ms and 8 in grid.ms
    acc = d.acceptance_curve()
    assert nodes_per_row(acc, 1, grid) >= nodes_per_row(acc, 8, grid)
    assert StandDrafter(SpecConfig(method="stand"), 259).template.meta["kind"] == "heuristic"


def test_online_curve_learns_which_nodes_pay():
    from stand.core.sizing import OnlineAcceptance, best_nodes

    costs = np.array([10.0 + 2.0 * k for k in range(65)])  # ms of a pass with k draft nodes per row
    useless, useful = OnlineAcceptance(), OnlineAcceptance()
    assert useless.curve() is None  # no evidence yet: the drafter's own tree
    for _ in range(200):
        useless.record(8, [0])  # eight nodes offered, none accepted
        useful.record(8, [0, 1, 2, 3])  # the first chain of three accepted every time
    assert best_nodes(useless.curve(), 1, costs) == 0  # plain decoding pays best
    assert best_nodes(useful.curve(), 1, costs) == 3
    assert useful.curve()[3] == pytest.approx(4.0, abs=0.02) and len(useful.curve()) == 9


def test_engine_drafts_plainly_where_drafts_never_land(tiny, monkeypatch):
    """pld on a prompt whose lookups always miss: after the online curve has evidence, most steps draft nothing."""
    from stand.core.tree import DraftTree
    from stand.drafters.pld import PromptLookup

    sizes = []
    real_fit = Engine._fit

    def spy(self, trees):
        sizes.extend(len(t) for t in trees)
        return real_fit(self, trees)

    monkeypatch.setattr(Engine, "_fit", spy)
    monkeypatch.setattr(PromptLookup, "propose", lambda self, row, *a: DraftTree.chain([7, 7, 7, 7]))
    grid = CostGrid({1: {1: 10.0, 2: 20.0, 8: 80.0}})
    d = make_drafter(SpecConfig(method="pld"), tiny.vocab_size)
    e = Engine(tiny, d, grid=grid)
    row = Row(tiny.encode("hello"), SamplingParams(max_new_tokens=60, ignore_eos=True))
    e.run([row])
    late = sizes[20:]
    assert late.count(0) > 0.8 * len(late), sizes
    assert row.generated == Engine(tiny, make_drafter(SpecConfig(method="none"), tiny.vocab_size)).run(
        [Row(row.prompt, row.params)])[0].generated


def test_probes_back_off_while_drafts_do_not_pay():
    from stand.core.sizing import ProbeSchedule

    stats = ProbeSchedule(every=16, most=256)
    probes = [now for now in range(2000) if stats.explores(now, paying=False)]
    assert probes[:5] == [0, 32, 96, 224, 480] and all(b - a == 256 for a, b in zip(probes[5:], probes[6:]))
    again = ProbeSchedule()
    assert again.explores(0, paying=False) and again.explores(0, paying=False)  # every row of a probe pass is told
    assert not again.explores(1, paying=False)
    paying = ProbeSchedule(every=16)
    assert [now for now in range(100) if paying.explores(now, paying=True)] == [0, 16, 32, 48, 64, 80, 96]


def test_engine_probes_a_group_in_the_same_passes_whatever_its_rows(tiny, monkeypatch):
    """Eight rows of a group probe together, as rarely as one row would (not every other pass)."""
    from stand.core.tree import DraftTree
    from stand.drafters.pld import PromptLookup

    passes = []
    real_fit = Engine._fit

    def spy(self, trees):
        passes.append(sum(len(t) > 0 for t in trees))
        return real_fit(self, trees)

    monkeypatch.setattr(Engine, "_fit", spy)
    monkeypatch.setattr(PromptLookup, "propose", lambda self, row, *a: DraftTree.chain([7, 7, 7, 7]))
    grid = CostGrid({b: {1: 10.0 * b, 2: 20.0 * b, 8: 80.0 * b} for b in (1, 8)})
    e = Engine(tiny, make_drafter(SpecConfig(method="pld"), tiny.vocab_size), grid=grid)
    params = SamplingParams(max_new_tokens=80, ignore_eos=True)
    e.run([Row(tiny.encode("hello"), params, index=j) for j in range(8)])
    probing = [i for i, k in enumerate(passes) if k]
    assert all(passes[i] == 8 for i in probing[1:]), passes  # the whole group or none of it
    assert len(probing) <= 5, probing  # the first pass, then ever rarer (32, 96 passes on)


def test_a_drafter_that_never_pays_here_stays_idle(tiny, monkeypatch):
    """STAND on a grid where every drafted token costs a whole pass: it never drafts, and learns nothing either."""
    from stand.drafters.stand import StandDrafter

    seen = []
    monkeypatch.setattr(StandDrafter, "observe", lambda self, *a: seen.append(a))
    steep = CostGrid({b: {t: 10.0 * b * t for t in (1, 2, 4, 8, 16, 32, 64)} for b in (1, 2, 4, 8, 16)})
    e = Engine(tiny, make_drafter(SpecConfig(method="stand"), tiny.vocab_size), grid=steep)
    assert e.sizer.idle
    row = Row(tiny.encode("hello"), SamplingParams(0.6, max_new_tokens=20, seed=0, ignore_eos=True))
    e.run([row])
    assert not seen and row.stats.mean_accepted == 1.0
    flat = CostGrid({b: {t: 10.0 for t in (1, 2, 4, 8, 16, 32, 64)} for b in (1, 2, 4, 8, 16)})
    assert not Engine(tiny, make_drafter(SpecConfig(method="stand"), tiny.vocab_size), grid=flat).sizer.idle


def test_machine_grid_is_measured_once_per_machine_and_model(tiny, tmp_path, monkeypatch):
    import stand.backends.machine as machine

    monkeypatch.setenv("STAND_CACHE", str(tmp_path))
    idle = GridConfig(cpu=lambda: None, busy_ratio=float("inf"))  # this shared machine may be busy: not the point here
    first = machine.machine_grid(tiny, idle)
    assert first.meta["machine"]["cpu_flags"] is not None and 1 in first.ms and 16 in first.ms

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(machine, "measure_grid", no_measuring)
    assert machine.machine_grid(tiny, idle).ms == first.ms  # from the cache
    monkeypatch.setattr(machine, "threads", lambda target: 64)  # another thread count: another machine
    with pytest.raises(AssertionError, match="measured again"):
        machine.machine_grid(tiny, idle)


def test_online_curve_counts_nodes_asked_even_when_none_is_drafted(tiny, monkeypatch):
    """A pass costs its width whatever each row drafted: a drafter asked for nodes that delivers none (no match)
    has them counted as offered and missed, so its curve learns that asking it does not pay."""
    from stand.core.sizing import OnlineAcceptance
    from stand.core.tree import DraftTree
    from stand.drafters.pld import PromptLookup

    recorded = []
    real_record = OnlineAcceptance.record
    monkeypatch.setattr(OnlineAcceptance, "record", lambda self, nodes, acc: (recorded.append(nodes),
                                                                              real_record(self, nodes, acc)))
    monkeypatch.setattr(PromptLookup, "propose", lambda self, row, *a: DraftTree())
    grid = CostGrid({1: {1: 10.0, 2: 11.0, 8: 18.0}})
    e = Engine(tiny, make_drafter(SpecConfig(method="pld"), tiny.vocab_size), grid=grid)
    e.run([Row(tiny.encode("hello"), SamplingParams(max_new_tokens=40, ignore_eos=True))])
    assert recorded[0] > 0  # the first pass probes: asked for nodes, got an empty tree
    assert recorded[-20:] == [0] * 20, recorded  # then it learns (past the optimistic prior): no nodes asked


def test_stand_learns_nothing_in_passes_where_its_curve_drafts_nothing(tiny, monkeypatch):
    """STAND on a grid where one row drafts but eight rows do not: eight rows' passes do not update its table."""
    from stand.drafters.stand import StandDrafter

    seen = []
    monkeypatch.setattr(StandDrafter, "observe", lambda self, row, *a: seen.append(row.uid))
    grid = CostGrid({1: {t: 10.0 for t in (1, 2, 4, 8, 16)},
                     8: {t: 80.0 * t for t in (1, 2, 4, 8, 16)}, 16: {t: 160.0 * t for t in (1, 2, 4, 8, 16)}})
    e = Engine(tiny, make_drafter(SpecConfig(method="stand"), tiny.vocab_size), grid=grid)
    assert not e.sizer.idle and e.sizer.budget(1)[0] > 0 and e.sizer.budget(8)[0] == 0
    params = SamplingParams(0.6, max_new_tokens=12, seed=0, ignore_eos=True)
    e.run([Row(tiny.encode("hello"), params, index=j) for j in range(8)])
    assert not seen
    e.run([Row(tiny.encode("hello"), params)])
    assert len(seen) == 12


def test_one_worth_rule_sizes_trees_and_chains():
    """The engine's choice of m (most tokens per ms over a curve) and the vLLM chains' best-first keep (a node joins
    while it pays by the worth rule) are one rule: on a linear cost they keep the same nodes."""
    from stand.core.sizing import acceptance_curve, best_nodes, keep_best_first

    rng = np.random.default_rng(0)
    for _ in range(200):
        values = np.sort(rng.random(12))[::-1]  # chances of the chain's nodes, best first
        base, marginal = rng.uniform(5, 20), rng.uniform(0.1, 4)
        costs = base + marginal * np.arange(13)  # [K] ms with k nodes
        assert keep_best_first([values], base, marginal) == [best_nodes(acceptance_curve(values), 1, costs)]


def test_fixed_nodes_give_every_row_the_same_budget_whatever_the_grid(tiny):
    """SpecConfig.nodes (equal budgets for comparing drafters): every row is asked for that many nodes, with no
    grid sizing and no online curve, even where the grid says no node pays."""
    steep = CostGrid({1: {1: 10.0, 2: 100.0, 16: 1000.0}, 8: {1: 20.0, 2: 400.0, 16: 4000.0}})
    for method in ("stand", "pld"):
        e = Engine(tiny, make_drafter(SpecConfig(method=method, nodes=5), tiny.vocab_size), grid=steep)
        assert not e.sizer.idle and e.sizer.learns(8)
        assert e.sizer.ask(0, 1, 0) == ((5, 0.0, None), None) and e.sizer.budget(8).nodes == 5
    with pytest.raises(StandError, match="nodes must be"):
        SpecConfig(method="stand", nodes=-1).validate()
