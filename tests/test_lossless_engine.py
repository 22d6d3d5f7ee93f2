"""Every drafter, through the whole engine, samples exactly the model's distribution (DESIGN.md section 2)."""

import pytest

from lossless import engine_samples, exact_joint, marginal_pvalues, small_target
from stand.drafters import DRAFTERS
from stand.params import SamplingParams, SpecConfig

# (method, extra SpecConfig fields); drafters add themselves here as they land
CASES = [
    ("none", {}),
    ("pld", {}),
    ("consensus", {}),
    ("consensus", {"consensus_k": 1, "consensus_tree": 6, "consensus_fuzzy": 1}),
    ("ngrammys", {}),
    ("stand", {}),
    ("stand", {"stochastic": False}),
    ("recycle", {}),
]
SAMPLING = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
]


@pytest.fixture(scope="module")
def target():
    return small_target()


@pytest.mark.parametrize("params", SAMPLING, ids=["T1", "T0.7-topk5-topp0.9"])
@pytest.mark.parametrize("method,extra", CASES, ids=[f"{m}{'-' + '-'.join(map(str, e.values())) if e else ''}" for m, e in CASES])
def test_engine_distribution_is_exact(target, method, extra, params):
    if method not in DRAFTERS:
        pytest.skip(f"{method} not registered")
    spec = SpecConfig(method=method, **extra)
    samples = engine_samples(target, spec, params, n=3000)
    pvals = marginal_pvalues(samples, exact_joint(target, params))
    assert min(pvals.values()) > 1e-4, pvals
