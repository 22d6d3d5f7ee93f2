"""The power check: verifiers with known bugs, patched in (monkeypatch), must fail the engine-level check that the
real verifier passes (tests/test_lossless_engine.py::test_wrong_drafts_stay_exact, same drafters, same wrong
drafts, same seeds), for STAND, stand-dynamic, consensus and stand+consensus.

The bugs: accepting with the un-renormalised q (siblings drawn without replacement ignored); the bonus token drawn
from p instead of the residual; a top-p off by one in the sampler (the token that reaches top_p left out);
accepting every first child. scripts/mutants.sh does the same with mutated copies of src.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

import stand.core.verify as verify_module
import stand.engine
from lossless import N, PLAIN, TRUNCATED, WRONG, engine_run, exact_joint, marginal_pvalues, small_target, wrong_id
from stand.core.verify import Verdict
from stand.params import SpecConfig

real_proposal, real_verify, real_sampler = verify_module._proposal, verify_module.verify, verify_module.sampler_probs


def unrenormalised_q(mp) -> None:
    """Every child is tested against the whole q, as if siblings were drawn with replacement."""
    mp.setattr(verify_module, "_proposal", lambda q, token, drawn: real_proposal(q, token, []))


def bonus_from_p(mp) -> None:
    """The real accept/reject walk, then the bonus token drawn from p at the last accepted node."""

    def verify(tree, logits, params, rng, probs=None):
        v = real_verify(tree, logits, params, rng, probs)
        p = probs[v.accepted[-1] if v.accepted else 0].double().numpy()
        return Verdict(v.accepted, int(rng.choice(len(p), p=p / p.sum())))

    mp.setattr(stand.engine, "verify", verify)


def accept_always(mp) -> None:
    """Every first child accepted, the bonus from p."""

    def verify(tree, logits, params, rng, probs=None):
        kids, node, accepted = tree.children(), 0, []
        while kids[node]:
            node = kids[node][0]
            accepted.append(node)
        p = probs[node].double().numpy()
        return Verdict(accepted, int(rng.choice(len(p), p=p / p.sum())))

    mp.setattr(stand.engine, "verify", verify)


def top_p_off_by_one(mp) -> None:
    """The nucleus counts each token's own mass: the token that reaches top_p is left out (the top one stays)."""

    def sampler(logits, params):
        probs = real_sampler(logits, replace(params, top_p=1.0))
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        upto = torch.cumsum(sorted_p, dim=-1)
        upto[..., 0] = 0.0
        sorted_p = sorted_p.masked_fill(upto >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return probs / probs.sum(-1, keepdim=True)

    mp.setattr(stand.engine, "sampler_probs", sampler)


BROKEN = {"unrenormalised-q": unrenormalised_q, "bonus-from-p": bonus_from_p, "top-p-off-by-one": top_p_off_by_one,
          "accept-always": accept_always}
DRAFTS = WRONG[:4]  # stand, stand-dynamic, consensus, stand+consensus; drafts made wrong on purpose
# consensus drafts are deterministic (one-hot q): un-renormalising a q they do not have changes nothing (checked below)
POWER = [(bug, *d) for bug in BROKEN for d in DRAFTS if not (bug == "unrenormalised-q" and d[0] == "consensus")]


@pytest.fixture(scope="module")
def target():
    return small_target()


@pytest.mark.parametrize("bug,method,extra,wrap", POWER, ids=[f"{p[0]}-{wrong_id(p[1:])}" for p in POWER])
def test_a_broken_verifier_fails_the_check(target, monkeypatch, bug, method, extra, wrap):
    params = TRUNCATED if bug == "top-p-off-by-one" else PLAIN
    BROKEN[bug](monkeypatch)
    run = engine_run(target, SpecConfig(method=method, options=extra), params, N, wrap=wrap)
    pvals = marginal_pvalues(run.samples, exact_joint(params))
    assert min(pvals.values()) < 1e-8, (pvals, run)  # the check wants > 1e-4: failed by a wide margin


def test_renormalising_q_cannot_matter_to_one_hot_drafts(target, monkeypatch):
    """Why consensus has no un-renormalised-q case: the mutant gives the very same samples."""
    method, extra, wrap = DRAFTS[2]
    spec = SpecConfig(method=method, options=extra)
    real = engine_run(target, spec, PLAIN, 500, wrap=wrap)
    unrenormalised_q(monkeypatch)
    assert np.array_equal(engine_run(target, spec, PLAIN, 500, wrap=wrap).samples, real.samples)
