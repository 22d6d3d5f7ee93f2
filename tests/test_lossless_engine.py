"""Every drafter, through the whole engine, samples exactly the model's distribution (docs/design.md, "Lossless verification"), on the
Hugging Face forward, our lean forward, our int4 forward over a Q4_0 GGUF file and llama.cpp.

The expected distribution comes from the model's float64 logits through the sampler written out in
tests/lossless.py (not the package's sampler_probs). Besides the drafters as they are (whose STAND tables learn
the model itself, so their drafts are rarely rejected), drafts made wrong on purpose (WRONG) make rejection, the
residual and the bonus token matter. tests/test_mutants_power.py shows that broken verifiers fail these checks.
"""


import numpy as np
import pytest
from extras import require, require_method
import torch

from lossless import (K, N, PLAIN, TRUNCATED, V, WRONG, Run, engine_run, exact_joint, marginal_pvalues, params_id,
                      reference_probs, small_gguf, small_int4, small_target, wrong_id)
from stand.core.cost import CostGrid
from stand.core.verify import sampler_probs
from stand.drafters.registry import make_drafter
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
    ("stand", {"refill": False}),  # the template alone (the default also draws its lost nodes best-first)
    ("stand", {"own_latest": False}),  # the question's running-mean table alone (no table of the sample's own)
    ("stand-dynamic", {}),
    ("stand-dynamic", {"stochastic": False}),
    ("recycle", {}),
    ("suffix", {}),  # one-hot trees from arctic-inference's suffix trees
    ("suffix", {"tree": False}),
]
TRUNCATED_METHODS = {"pld", "stand", "stand-dynamic", "suffix"}
RUNS = [(m, e, PLAIN) for m, e in CASES] + [(m, e, TRUNCATED) for m, e in CASES if m in TRUNCATED_METHODS and not e]
BACKENDS = ("hf", "lean", "int4", "llama.cpp")
BATCH = {"hf": 250, "lean": 250, "int4": 250, "llama.cpp": 50}  # llama.cpp: 256 sequences a pass, so 5 leaves per row of 50
# llama.cpp: tests/test_llamacpp.py::test_sampling_is_exact checks the methods it names at T=1 (where its expected
# distribution, from sampler_probs, is a plain softmax); the other runs are checked here
LLAMACPP_ELSEWHERE = {("none", ()), ("pld", ()), ("recycle", ()), ("stand", ()), ("stand", (("stochastic", False),)),
                      ("stand-dynamic", ()), ("consensus", (("k", 2),)), ("ngrammys", ()), ("stand+consensus", (("k", 2),))}
ENGINE_RUNS = [(b, *r) for b in BACKENDS for r in RUNS
               if b != "llama.cpp" or r[2] is not PLAIN or (r[0], tuple(r[1].items())) not in LLAMACPP_ELSEWHERE]
# every backend at T=1; the truncated sampler (which the top-p power check needs) on the Hugging Face forward
WRONG_RUNS = [(b, *w, PLAIN) for w in WRONG for b in BACKENDS] + [("hf", *w, TRUNCATED) for w in WRONG]


def run_id(run) -> str:
    method, extra, params = run
    return "-".join([method, *(f"{k}={v}" for k, v in extra.items()), params_id(params)])


def exact_run(target, spec: SpecConfig, params: SamplingParams, batch: int = 250, grid=None, wrap=None) -> Run:
    """The check: N engine samples against the exact distribution (chi-square on pairs and triples, p > 1e-4)."""
    run = engine_run(target, spec, params, N, batch, grid, wrap)
    source = getattr(target, "source", None)  # int4: the file whose de-quantised weights are the model
    pvals = marginal_pvalues(run.samples, exact_joint(params, source=source))
    assert min(pvals.values()) > 1e-4, pvals
    return run


def build(name: str, tmp_path_factory):
    if name == "int4":
        return small_int4(str(tmp_path_factory.mktemp("int4") / "small.Q4_0.gguf"))
    if name != "llama.cpp":
        return small_target(forward=name)
    require("llama_cpp")
    import stand.backends.llamacpp as llamacpp

    with pytest.MonkeyPatch.context() as mp:  # one thread: on a shared 2-core machine two threads spin-wait ~15x slower
        mp.setattr(llamacpp, "threads", lambda: 1)
        return llamacpp.LlamaCppModel(small_gguf(str(tmp_path_factory.mktemp("gguf") / "small.gguf")), None)


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = build(name, tmp_path_factory)
        return made[name]

    return get


@pytest.mark.parametrize("backend,method,extra,params", ENGINE_RUNS, ids=[f"{r[0]}-{run_id(r[1:])}" for r in ENGINE_RUNS])
def test_engine_distribution_is_exact(backends, backend, method, extra, params):
    require_method(method)
    run = exact_run(backends(backend), SpecConfig(method=method, options=extra), params, BATCH[backend])
    if method != "none":  # drafts were accepted (and, below K per step, rejected): the test exercised them
        assert 1.02 < run.per_step < K, run.per_step


@pytest.mark.parametrize("backend,method,extra,wrap,params", WRONG_RUNS,
                         ids=[f"{r[0]}-{wrong_id(r[1:4])}-{params_id(r[4])}" for r in WRONG_RUNS])
def test_wrong_drafts_stay_exact(backends, backend, method, extra, wrap, params):
    """Drafts unlike the model: rejected often (the residual and the bonus token decide), accepted often too."""
    run = exact_run(backends(backend), SpecConfig(method=method, options=extra), params, BATCH[backend], wrap=wrap)
    assert run.rejected > 0.1 and run.accepted > 0.25 and run.per_step < 2.5, run  # per step: at most K = 3
    if method == "stand+consensus":
        assert run.drafter.graft_accepted > 0, "no grafted node was ever accepted"


@pytest.mark.parametrize("backend", ["hf", "lean", "int4"])
def test_trees_cut_by_the_cost_grid_stay_exact(backends, backend):
    """STAND trees cut to the few best nodes a pass can afford (siblings included) keep the distribution."""
    target = backends(backend)
    grid = CostGrid({1: {1: 10.0, 64: 20.0}, 256: {1: 100.0, 2: 101.0, 3: 102.0, 4: 103.0, 5: 104.0, 6: 400.0}})
    spec = SpecConfig(method="stand")
    assert Engine(target, make_drafter(spec, target.vocab_size), grid=grid).sizer.budget(250)[0] == 4
    run = exact_run(target, spec, PLAIN, grid=grid)
    assert 1.02 < run.per_step < K, run.per_step


@pytest.mark.parametrize("backend", ["hf", "lean", "int4"])
def test_best_first_trees_under_a_pass_floor_stay_exact(backends, backend):
    """stand-dynamic with the floor a cost grid sets: tree shapes follow the table's confidence, draw by draw."""
    target = backends(backend)
    grid = CostGrid({1: {1: 10.0, 64: 20.0}, 256: {1: 100.0, 2: 101.0, 3: 102.0, 4: 103.0, 5: 104.0, 6: 110.0}})
    spec = SpecConfig(method="stand-dynamic")
    nodes, floor, _ = Engine(target, make_drafter(spec, target.vocab_size), grid=grid).sizer.budget(250)
    assert 0.05 < floor < 0.5, floor
    run = exact_run(target, spec, PLAIN, grid=grid)
    assert 1.02 < run.per_step < K, run.per_step


@pytest.mark.parametrize("backend", ["hf", "lean", "int4"])
@pytest.mark.parametrize("method", ["none", "stand"])
def test_padded_passes_stay_exact(backends, backend, method, monkeypatch):
    """A grid on which a wider pass is cheaper (4 tokens per row cost less than 1, 2 or 3): every pass of fewer
    runs padded to 4, and the distribution is the model's."""
    from stand.backends.torch import TorchCache

    padded = []
    real_step = TorchCache.step

    def spy(self, trees, roots, width=None):
        padded.append(width is not None and width > max(len(t) for t in trees) + 1)
        return real_step(self, trees, roots, width)

    monkeypatch.setattr(TorchCache, "step", spy)
    grid = CostGrid({1: {1: 10.0, 64: 20.0}, 256: {1: 100.0, 2: 101.0, 3: 102.0, 4: 60.0, 5: 400.0, 6: 800.0}})
    run = exact_run(backends(backend), SpecConfig(method=method), PLAIN, grid=grid)
    assert sum(padded) > 0.2 * len(padded), (sum(padded), len(padded))
    if method != "none":
        assert 1.02 < run.per_step < K, run.per_step


# ---- the reference sampler the expected distribution comes from ------------------------------------------------

def test_reference_sampler_cuts_where_the_definition_says():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert np.allclose(reference_probs(logits, 1.0, 0, 0.79), [0.5 / 0.8, 0.3 / 0.8, 0, 0])  # 0.8 reaches 0.79
    assert np.allclose(reference_probs(logits, 1.0, 0, 0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert np.allclose(reference_probs(logits, 1.0, 1, 1.0), [1, 0, 0, 0])
    p = reference_probs(logits, 0.5, 3, 1.0)
    assert np.allclose(p, np.array([0.25, 0.09, 0.0225, 0]) / 0.3625)


@pytest.mark.parametrize("params", [PLAIN, TRUNCATED, SamplingParams(temperature=1.3, top_k=3),
                                    SamplingParams(temperature=0.5, top_p=0.6), SamplingParams()],
                         ids=["T1", "T0.7-k5-p0.9", "T1.3-k3", "T0.5-p0.6", "greedy"])
def test_package_sampler_agrees_with_the_reference(params):
    """stand's sampler_probs and the reference agree on random logits (a bug in either shows here first)."""
    logits = torch.randn(200, V, generator=torch.Generator().manual_seed(0)) * 3
    got = sampler_probs(logits, params).double().numpy()
    want = np.stack([reference_probs(lg, params.temperature, params.top_k, params.top_p) for lg in logits.numpy()])
    assert np.abs(got - want).max() < 1e-5
