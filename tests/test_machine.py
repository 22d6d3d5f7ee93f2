"""This machine: padded cost grids, grids measured robustly (busy machines detected, their grids not cached), the
dtype chosen by measurement, and the tests' own cache. Timings come from a fake backend on a fake clock: fast and
deterministic."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

import stand.backends.machine as machine
from stand.backends.probe import GridConfig, measure_grid
from stand.core.cost import CostGrid
from stand.core.sizing import nodes_per_row
from stand.core.files import cache_dir

# ---- a backend whose passes take the time we say ---------------------------------------------------------------


class Clock:
    """Seconds, advanced only by the fake backend's passes."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeCache:
    """Like llama.cpp's, one cache at a time: a new cache invalidates the older ones."""

    def __init__(self, backend: "FakeBackend"):
        self.backend, self.rows = backend, 0
        backend.generation += 1
        self.generation = backend.generation

    def prefill(self, prefixes, on_logits=None):
        self.rows += len(prefixes)

    def step(self, trees, roots, width=None):
        b = self.backend
        assert self.generation == b.generation, "a cache used after a newer one was made"
        b.calls += 1
        tokens = max(len(t) for t in trees) + 1
        b.clock.now += b.cost(self.rows, tokens) * b.slowdown(b) / 1000.0
        return [torch.zeros(len(t) + 1, 4) for t in trees]

    def commit(self, paths):
        pass


class FakeBackend:
    """cost(rows, tokens) ms per pass; slowdown(backend) multiplies it (load from other processes)."""

    kind, vocab_size, threads, pads = "fake", 16, 1, True

    def __init__(self, cost, clock: Clock, slowdown=lambda b: 1.0, name: str = "fake", dtype: str = "float32"):
        self.cost, self.clock, self.slowdown, self.name, self.dtype = cost, clock, slowdown, name, dtype
        self.calls = self.generation = 0

    def new_cache(self):
        return FakeCache(self)

    def fingerprint(self) -> str:
        return f"{self.name}-{self.dtype}"


def linear(rows: int, tokens: int) -> float:
    return 5.0 + 0.5 * rows * tokens


def idle_cpu(clock: Clock, others: float = 0.0):
    """A /proc/stat stand-in: this process used one core all along, other processes `others` cores."""
    return lambda: (clock.now * (1.0 + others), clock.now)


def config(clock: Clock, others: float = 0.0, **kw) -> GridConfig:
    return GridConfig(rows=(1, 2, 4), tokens=(1, 2, 4, 8), clock=clock, cpu=idle_cpu(clock, others), cpus=2, **kw)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_CACHE", str(tmp_path))
    monkeypatch.setattr(machine, "_this_run", {})
    return tmp_path


# ---- padded grids --------------------------------------------------------------------------------------------

# measured on a CPU with avx512_bf16 (docs/results.md, "Pass shapes on torch"): one token dearer than two, 8 rows dearer than 16
JAGGED = {1: {1: 23.0, 2: 17.0, 4: 19.0, 8: 21.0, 16: 31.0}, 8: {1: 267.0, 2: 127.0, 4: 140.0}, 16: {1: 127.0, 2: 140.0}}


def test_padded_grid_runs_the_cheapest_wider_shape():
    g = CostGrid(JAGGED, pads=True)
    assert g.pad_to(1, 1) == 2 and g(1, 1) == pytest.approx(17.0)  # one token runs as two
    assert g.pad_to(1, 2) == 2 and g.pad_to(1, 16) == 16 and g(1, 16) == pytest.approx(31.0)
    assert g.pad_to(8, 1) == 2 and g(8, 1) == pytest.approx(127.0)  # 8 rows x 1 token runs as 8 x 2 (= 16 x 1)
    assert g.pad_to(1, 40) == 40 and g(1, 40) >= g(1, 16)  # beyond the widest measured: no padding, never cheaper
    for rows in (1, 2, 5, 8, 12, 16, 32):  # what the budget reads never decreases with the tokens of a pass
        costs = [g(rows, k) for k in range(1, 40)]
        assert np.all(np.diff(costs) >= -1e-9), (rows, costs)
        assert all(g.pad_to(rows, k) >= k for k in range(1, 40))
    plain = CostGrid(JAGGED)  # a backend that cannot pad reads the same measurements non-decreasing
    assert plain.pad_to(1, 1) == 1 and plain(1, 1) == pytest.approx(23.0) and plain(1, 2) == pytest.approx(23.0)


def test_budget_reads_the_padded_costs():
    acc = np.array([1.0, 1.2, 1.3])
    g = CostGrid({1: {1: 30.0, 2: 20.0, 3: 31.0}})
    assert nodes_per_row(acc, 1, g) == 2  # unpadded: 30, 30 (noise read away), 31 ms
    assert nodes_per_row(acc, 1, g.with_padding(True)) == 1  # padded: 20, 20, 31 ms: one node is free


def test_engine_reads_the_grid_as_its_backend_runs_passes(tiny):
    from stand.drafters.registry import make_drafter
    from stand.engine import Engine
    from stand.params import SpecConfig

    d = make_drafter(SpecConfig(method="pld"), tiny.vocab_size)
    assert Engine(tiny, d, grid=CostGrid(JAGGED)).grid.pads  # torch pads
    no_pad = FakeBackend(linear, Clock())
    no_pad.pads = False
    no_pad.max_pass_tokens = None
    assert not Engine(no_pad, d, grid=CostGrid(JAGGED, pads=True)).grid.pads


# ---- robust measurement --------------------------------------------------------------------------------------

def test_grid_keeps_the_fastest_repeat():
    """Load that comes and goes (every third pass three times slower) does not reach the grid."""
    clock = Clock()
    spiky = FakeBackend(linear, clock, slowdown=lambda b: 3.0 if b.calls % 3 == 0 else 1.0)
    g = measure_grid(spiky, config(clock))
    assert g.ms == {b: {t: pytest.approx(linear(b, t)) for t in (1, 2, 4, 8)} for b in (1, 2, 4)}
    assert g.meta["busy"] is None and g.meta["reference_ms"] == [pytest.approx(5.5)] * 2


def test_machine_slower_at_the_end_is_busy():
    clock = Clock()
    late_load = FakeBackend(linear, clock, slowdown=lambda b: 2.0 if clock.now > 0.4 else 1.0)
    g = measure_grid(late_load, config(clock))
    assert "at the start" in g.meta["busy"] and g.meta["reference_ms"] == [pytest.approx(5.5), pytest.approx(11.0)]


def test_other_processes_on_our_cores_mean_busy():
    clock = Clock()
    g = measure_grid(FakeBackend(linear, clock), config(clock, others=1.5))  # 2 cores, we use 1, others 1.5
    assert "other processes" in g.meta["busy"]
    assert measure_grid(FakeBackend(linear, clock), config(clock, others=1.0)).meta["busy"] is None  # the free core


def test_busy_grid_is_for_this_run_only(cache, caplog, monkeypatch):
    clock = Clock()
    busy = FakeBackend(linear, clock)
    cfg = config(clock, others=1.5)
    with caplog.at_level(logging.WARNING, logger="stand"):
        g = machine.machine_grid(busy, cfg)
    assert [r.message for r in caplog.records if "busy machine" in r.message and "next time" in r.message]
    assert not os.path.exists(machine.grid_path(machine.machine_key(busy)))  # not cached

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    with monkeypatch.context() as m:
        m.setattr(machine, "measure_grid", no_measuring)
        assert machine.machine_grid(busy, cfg) is g  # the rest of this run uses it
    monkeypatch.setattr(machine, "_this_run", {})  # the next run measures again; now the machine is idle
    again = machine.machine_grid(busy, config(clock))
    assert again.meta["busy"] is None and os.path.exists(machine.grid_path(machine.machine_key(busy)))


def test_measuring_here_replaces_the_cached_grid(cache):
    """What `stand profile --grid` does: measure on demand, and the next run reads the new grid."""
    clock = Clock()
    target = FakeBackend(linear, clock)
    first = machine.machine_grid(target, config(clock))
    target.cost = lambda rows, tokens: 2 * linear(rows, tokens)
    machine.measure_here(target, config(clock))
    assert machine.machine_grid(target, config(clock)).ms[1][1] == pytest.approx(2 * first.ms[1][1])


# ---- dtype by measurement -------------------------------------------------------------------------------------

def fake_models(clock: Clock, bf16_cost, f32_cost, opened: list, others: float = 0.0):
    costs = {"bfloat16": bf16_cost, "float32": f32_cost}

    def open_model(dtype: str, fresh: bool):
        opened.append((dtype, fresh))
        return FakeBackend(costs[dtype], clock, dtype=dtype)

    return open_model


@pytest.fixture
def measured_here(monkeypatch):
    """machine's own measurements run on the fake clock (no /proc/stat, no real time)."""
    clock = Clock()
    state = {"others": 0.0}
    real = machine.measure_grid
    monkeypatch.setattr(machine, "measure_grid", lambda t, cfg=None, progress=None: real(
        t, config(clock, state["others"]), progress))
    return clock, state


def test_auto_dtype_is_the_faster_here_and_cached(cache, tmp_path, measured_here):
    clock, _ = measured_here
    model = tmp_path / "m.gguf"
    model.write_bytes(b"gguf")
    opened = []
    slow = lambda rows, tokens: 3 * linear(rows, tokens)  # noqa: E731
    target = machine.fastest_dtype(str(model), "auto", fake_models(clock, linear, slow, opened))
    assert target.dtype == "bfloat16" and opened == [("bfloat16", True), ("float32", True)]
    doc = json.loads(open(machine.dtype_cache()).read())
    assert [v["dtype"] for v in doc.values()] == ["bfloat16"]
    assert len(os.listdir(os.path.join(cache_dir(), "grids"))) == 2  # both grids kept as this machine's
    opened.clear()
    again = machine.fastest_dtype(str(model), "auto", fake_models(clock, slow, linear, opened))
    assert again.dtype == "bfloat16" and opened == [("bfloat16", False)]  # from the cache: one load, not measured
    other = machine.fastest_dtype(str(model), "hf", fake_models(clock, slow, linear, opened))
    assert other.dtype == "float32"  # another forward is measured for itself


def test_auto_dtype_on_a_busy_machine_is_not_cached(cache, tmp_path, measured_here):
    clock, state = measured_here
    state["others"] = 1.5
    model = tmp_path / "m.gguf"
    model.write_bytes(b"gguf")
    target = machine.fastest_dtype(str(model), "auto", fake_models(clock, linear, linear, []))
    assert target.dtype in machine.DTYPES and not os.path.exists(machine.dtype_cache())


def test_explicit_dtype_loads_without_measuring(monkeypatch):
    from stand.backends import load

    monkeypatch.setattr(machine, "fastest_dtype", lambda *a: (_ for _ in ()).throw(AssertionError("measured")))
    monkeypatch.setattr(load, "open_torch", lambda path, dtype, forward, fresh=False: (dtype, fresh))
    monkeypatch.setattr(load, "check_path", lambda p: p)
    monkeypatch.setattr(load, "choose_backend", lambda p, b: "torch")
    assert load.load_model.__wrapped__("m", "bfloat16", "torch", "auto") == ("bfloat16", False)


# ---- the tests' own cache -------------------------------------------------------------------------------------

def test_the_session_caches_outside_the_home_directory():
    home = os.path.join(os.path.expanduser("~"), ".cache", "stand")
    assert os.path.abspath(cache_dir()) != os.path.abspath(home)


# ---- padded passes change no output ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["hf", "lean"])
def forward(request):
    from stand.backends.lean import with_forward
    from tiny import tiny_target

    return with_forward(tiny_target(seed=3), request.param)


def branchy(tokens):
    from stand.core.tree import DraftTree

    t = DraftTree()
    a = t.add(tokens[0], -1)
    t.add(tokens[1], a)
    t.add(tokens[2], -1)
    return t


@torch.inference_mode()
def test_padded_step_gives_the_same_logits_and_cache(forward):
    """A pass widened with padding: the same logits at every node, and the same cache after commit."""
    from stand.core.tree import DraftTree

    prompts = [[10, 20, 30, 40, 50, 60], [11, 21, 31]]
    trees = [branchy([1, 2, 3]), DraftTree.chain([7])]
    out = {}
    for width in (None, 9):
        cache = forward.new_cache()
        cache.prefill([p[:-1] for p in prompts])
        logits = cache.step(trees, [p[-1] for p in prompts], width)
        assert logits.shape[1] == 4  # the padding's logits are dropped
        cache.commit([[0, 1, 2], [0, 1]])
        out[width] = logits, cache.step([DraftTree(), DraftTree()], [5, 6])
    for a, b in zip(out[None], out[9]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_greedy_output_with_padding_equals_plain(forward, monkeypatch):
    """Every pass padded to the cheap width: greedy output is plain greedy decoding's, token for token."""
    from stand.backends.torch import TorchCache
    from stand.core.sequence import Row
    from stand.drafters.registry import make_drafter
    from stand.engine import Engine
    from stand.params import SamplingParams, SpecConfig

    widths = []
    real_step = TorchCache.step

    def spy(self, trees, roots, width=None):
        widths.append((width, max(len(t) for t in trees) + 1))
        return real_step(self, trees, roots, width)

    monkeypatch.setattr(TorchCache, "step", spy)
    wide_is_cheap = CostGrid({1: {1: 50.0, 2: 49.0, 4: 48.0, 6: 20.0, 8: 90.0}, 2: {1: 60.0, 6: 30.0, 8: 95.0}})
    prompt = forward.encode("one two three, one two three, one two")
    params = SamplingParams(0.0, max_new_tokens=40)
    plain = Engine(forward, make_drafter(SpecConfig(method="none"), forward.vocab_size)).run(
        [Row(prompt, params), Row(prompt[3:], params)])
    for method in ("none", "pld", "stand"):
        widths.clear()
        rows = Engine(forward, make_drafter(SpecConfig(method=method), forward.vocab_size), grid=wide_is_cheap).run(
            [Row(prompt, params), Row(prompt[3:], params)])
        assert [r.generated for r in rows] == [r.generated for r in plain], method
        assert any(w is not None and w > need for w, need in widths), (method, widths)
        assert all(w in (None, 6) for w, _ in widths), widths


def test_profile_grid_remeasures_this_machine(cache, tmp_path, monkeypatch):
    """`stand profile --grid FILE` measures now, writes FILE and replaces this machine's cached grid."""
    from dataclasses import replace

    from typer.testing import CliRunner

    from stand.cli import app
    from tiny import save_tiny

    real = machine.measure_grid

    def small_and_idle(target, cfg=None, progress=None):
        grid = real(target, replace(cfg, rows=(1, 2), tokens=(1, 2)), progress)
        grid.meta["busy"] = None  # this shared machine may be busy; the caching is what is tested
        return grid

    monkeypatch.setattr(machine, "measure_grid", small_and_idle)
    out = tmp_path / "grid.json"
    res = CliRunner().invoke(app, ["profile", "--model", save_tiny(str(tmp_path / "tiny")), "--dtype", "float32",
                                   "--cache-len", "16", "--reps", "1", "--grid", str(out)])
    assert res.exit_code == 0, res.output
    cached = os.listdir(os.path.join(cache, "grids"))
    assert len(cached) == 1 and "cached for this machine" in res.output
    assert CostGrid.load(os.path.join(cache, "grids", cached[0])).ms == CostGrid.load(str(out)).ms
