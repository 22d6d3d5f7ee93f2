"""Statistical check that a whole engine (drafter + verifier) samples exactly the model's distribution.

A tiny random llama over a vocabulary of 8 tokens: every 3-token continuation of a prompt has a
probability we compute exactly; thousands of engine samples must match it (chi-square).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.stats import chisquare

from stand.drafters.registry import make_drafter
from stand.core.sequence import Row
from stand.engine import Engine
from stand.backends.torch import Target
from stand.params import SamplingParams, SpecConfig
from stand.testing import tiny_model
from stand.core.verify import sampler_probs

V, K = 8, 3  # vocabulary, generated tokens
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2, 4, 5, 1, 2]  # repeats, so lookup drafters have matches


def small_target(seed: int = 0, sharpness: float = 6.0) -> Target:
    return Target(tiny_model(vocab_size=V, seed=seed, sharpness=sharpness), None, "tiny-v8", torch.float32)


@torch.inference_mode()
def exact_joint(target: Target, params: SamplingParams) -> np.ndarray:
    """[V]*K array: the probability of every K-token continuation of PROMPT."""
    seqs = torch.tensor([PROMPT + list(s) for s in itertools.product(range(V), repeat=K)])  # [V^K, P+K]
    logits = target.model(seqs).logits[:, len(PROMPT) - 1: -1]  # [V^K, K, V]
    probs = sampler_probs(logits, params).double()
    step = probs.gather(-1, seqs[:, len(PROMPT):, None])[..., 0]  # [V^K, K]
    return step.prod(-1).reshape([V] * K).numpy()


def engine_samples(target: Target, spec: SpecConfig, params: SamplingParams, n: int, batch: int = 250, grid=None):
    """[n, K] continuations from the engine (rows of a batch share one drafter group), and tokens per step.
    grid: a cost grid that sizes every row's tree (budget.py); None: whole trees."""
    drafter = make_drafter(spec, target.vocab_size, target)  # target: drafters with model tables build them
    out, steps = [], 0
    for b in range(n // batch):
        p = SamplingParams(params.temperature, params.top_p, params.top_k, K, seed=1000 + b, ignore_eos=True)
        rows = [Row(PROMPT, p, group=b, index=i) for i in range(batch)]
        Engine(target, drafter, grid=grid).run(rows)
        out += [r.generated for r in rows]
        steps += sum(r.stats.steps for r in rows)
    return np.array(out), len(out) * K / steps


def pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of observed counts against expected probabilities (cells with < 5 expected merged)."""
    idx = np.ravel_multi_index(samples.T, probs.shape) if samples.ndim == 2 else samples
    counts = np.bincount(idx, minlength=probs.size).astype(float)
    expected = probs.ravel() * len(idx)
    small = expected < 5
    f_obs = np.append(counts[~small], counts[small].sum())
    f_exp = np.append(expected[~small], expected[small].sum())
    if f_exp[-1] == 0:
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    return float(chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue)


def marginal_pvalues(samples: np.ndarray, joint: np.ndarray) -> dict[str, float]:
    """p-values for the pairs (x1, x2), (x2, x3) and the triple itself."""
    return {
        "x1x2": pvalue(samples[:, :2], joint.sum(2)),
        "x2x3": pvalue(samples[:, 1:], joint.sum(0)),
        "x1x2x3": pvalue(samples, joint),
    }
