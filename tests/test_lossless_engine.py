"""Every drafter, through the whole engine, samples exactly the model's distribution (DESIGN.md section 2)."""

import pytest

from lossless import K, engine_samples, exact_joint, marginal_pvalues, small_target
from stand.core.budget import CostGrid
from stand.drafters.registry import DRAFTERS, make_drafter
from stand.engine import Engine
from stand.params import SamplingParams, SpecConfig

# (method, the drafter's options); drafters add themselves here as they land
CASES = [
    ("none", {}),
    ("pld", {}),
    ("consensus", {"k": 2}),  # the prompt has 2-gram matches from the first step
    ("consensus", {"k": 1, "nodes": 6, "fuzzy": 1}),
    ("ngrammys", {}),
    ("stand+consensus", {"k": 2}),
    ("stand", {}),
    ("stand", {"stochastic": False}),
    ("stand-dynamic", {}),
    ("stand-dynamic", {"stochastic": False}),
    ("recycle", {}),
]
PLAIN = SamplingParams(temperature=1.0)
TRUNCATED = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)  # run for the methods named below
TRUNCATED_METHODS = {"pld", "stand", "stand-dynamic"}
RUNS = [(m, e, PLAIN) for m, e in CASES] + [(m, e, TRUNCATED) for m, e in CASES if m in TRUNCATED_METHODS and not e]


def run_id(run) -> str:
    method, extra, params = run
    return "-".join([method, *map(str, extra.values()), "T1" if params is PLAIN else "T0.7-k5-p0.9"])


@pytest.fixture(scope="module")
def target():
    return small_target()


@pytest.mark.parametrize("method,extra,params", RUNS, ids=[run_id(r) for r in RUNS])
def test_engine_distribution_is_exact(target, method, extra, params):
    if method not in DRAFTERS:
        pytest.skip(f"{method} not registered")
    spec = SpecConfig(method=method, options=extra)
    samples, per_step = engine_samples(target, spec, params, n=2000)
    pvals = marginal_pvalues(samples, exact_joint(target, params))
    assert min(pvals.values()) > 1e-4, pvals
    if method != "none":  # drafts were accepted (and, below K per step, rejected): the test exercised them
        assert 1.02 < per_step < K, per_step


def test_trees_cut_by_the_cost_grid_stay_exact(target):
    """STAND trees cut to the few best nodes a pass can afford (siblings included) keep the distribution."""
    grid = CostGrid({1: {1: 10.0, 64: 20.0}, 256: {1: 100.0, 2: 101.0, 3: 102.0, 4: 103.0, 5: 104.0, 6: 400.0}})
    spec = SpecConfig(method="stand")
    assert Engine(target, make_drafter(spec, target.vocab_size), grid=grid).budget(250)[0] == 4
    samples, per_step = engine_samples(target, spec, PLAIN, n=2000, grid=grid)
    pvals = marginal_pvalues(samples, exact_joint(target, PLAIN))
    assert min(pvals.values()) > 1e-4, pvals
    assert 1.02 < per_step < K, per_step


def test_best_first_trees_under_a_pass_floor_stay_exact(target):
    """stand-dynamic with the floor a cost grid sets: tree shapes follow the table's confidence, draw by draw."""
    grid = CostGrid({1: {1: 10.0, 64: 20.0}, 256: {1: 100.0, 2: 101.0, 3: 102.0, 4: 103.0, 5: 104.0, 6: 110.0}})
    spec = SpecConfig(method="stand-dynamic")
    nodes, floor, _ = Engine(target, make_drafter(spec, target.vocab_size), grid=grid).budget(250)
    assert 0.05 < floor < 0.5, floor
    samples, per_step = engine_samples(target, spec, PLAIN, n=2000, grid=grid)
    pvals = marginal_pvalues(samples, exact_joint(target, PLAIN))
    assert min(pvals.values()) > 1e-4, pvals
    assert 1.02 < per_step < K, per_step
