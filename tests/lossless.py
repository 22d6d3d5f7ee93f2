"""Statistical check that a whole engine (drafter + verifier) samples exactly the model's distribution.

A tiny random llama over a vocabulary of 8 tokens: every 3-token continuation of a prompt has a probability we
compute exactly, from the model's float64 logits through a sampler written out here in numpy (`reference_probs`,
not the package's sampler_probs, so a sampler bug in src shows); thousands of engine samples must match it
(chi-square). Drafts can be made wrong on purpose (`Skewed` tables, `Perturbed` trees) so that rejection, the
residual and the bonus token all matter; `Run` says how often they did. Broken verifiers that these checks must
catch live in tests/test_mutants_power.py.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import chisquare

from stand.backends.torch import Target
from stand.core.sequence import Row
from stand.core.drafter import PromptDists
from stand.core.tree import DraftTree
from stand.drafters.registry import make_drafter
from stand.engine import Engine
from stand.params import SamplingParams, SpecConfig
from tiny import tiny_model

V, K = 8, 3  # vocabulary, generated tokens
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2, 4, 5, 1, 2]  # repeats, so lookup drafters have matches
SEED, SHARPNESS = 0, 6.0  # the small model


def small_target(seed: int = SEED, sharpness: float = SHARPNESS, forward: str = "hf") -> Target:
    """The small model on the Hugging Face forward ("hf") or our lean one ("lean"). (int4: small_int4.)"""
    target = Target(tiny_model(vocab_size=V, seed=seed, sharpness=sharpness), None, "tiny-v8", torch.float32)
    if forward == "lean":
        from stand.backends.lean import LeanTarget, with_forward

        target = with_forward(target, "lean")
        assert isinstance(target, LeanTarget)
    return target


def small_gguf(path: str, seed: int = SEED, sharpness: float = SHARPNESS, matrices: str = "F32",
               table: str = "F32") -> str:
    """The small model as a GGUF file llama.cpp runs (float32, or quantised: tiny.save_gguf); returns the path."""
    from tiny import save_gguf

    model = tiny_model(vocab_size=V, seed=seed, sharpness=sharpness)
    return save_gguf(model, [f"t{i}" for i in range(V)], path, bos=0, eos=V - 1, matrices=matrices, table=table)


def small_int4(path: str, seed: int = SEED, sharpness: float = SHARPNESS) -> Target:
    """The small model as Q4_0 layer matrices and a Q8_0 embedding/head in a GGUF file at `path`, on the int4
    lean forward in float32 compute (exact products: the reference below is that file's de-quantised weights).
    Its `source` is the file, which context_logits reads the reference from."""
    from stand.backends.int4 import Int4Options, Int4Target, lean_from_gguf, skeleton

    small_gguf(path, seed, sharpness, matrices="Q4_0", table="Q8_0")
    model = skeleton(path)
    lean = lean_from_gguf(path, model, Int4Options(compute=torch.float32))
    return Int4Target(model, None, "tiny-v8-q4", "int4", lean=lean, source=path)


# ---- the expected distribution, independent of the package's sampler -----------------------------------------

def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """[V] logits -> [V] float64 distribution a sampler draws from: logits / temperature (1 when 0), the top_k
    largest kept (0: all), then the smallest set of the most likely tokens whose mass reaches top_p. Asserts
    that no tie or rounding could move a cut (the answer would then depend on float details)."""
    x = np.asarray(logits, dtype=np.float64) / (temperature or 1.0)
    order = np.argsort(-x, kind="stable")
    k = top_k if 0 < top_k < len(x) else len(x)
    if k < len(x):
        assert x[order[k - 1]] - x[order[k]] > 1e-6, "top-k cut at a tie"
    kept = order[:k]
    w = np.exp(x[kept] - x[kept].max())
    w = w / w.sum()
    if top_p < 1.0:
        mass, n = 0.0, 0
        while mass < top_p:  # take the next most likely token until the mass reaches top_p
            mass += w[n]
            n += 1
        assert min(abs(mass - top_p), abs(mass - w[n - 1] - top_p)) > 1e-6, "top-p cut at a rounding edge"
        kept, w = kept[:n], w[:n] / w[:n].sum()
    out = np.zeros(len(x))
    out[kept] = w
    return out


@functools.lru_cache(maxsize=None)
def context_logits(seed: int = SEED, sharpness: float = SHARPNESS, source: str | None = None) -> np.ndarray:
    """[V^(K-1), K, V] float64 logits after PROMPT + h[:d] (d = 0..K-1) for every head h of K-1 tokens; source:
    a GGUF file whose weights (de-quantised by transformers) are the model, else the small float model."""
    if source is None:
        model = tiny_model(vocab_size=V, seed=seed, sharpness=sharpness).double()
    else:
        from transformers import AutoModelForCausalLM

        directory, name = source.rsplit("/", 1)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float64).eval()
    seqs = torch.tensor([PROMPT + list(h) for h in itertools.product(range(V), repeat=K - 1)])
    with torch.inference_mode():
        return model(seqs).logits[:, len(PROMPT) - 1:].numpy()


def exact_joint(params: SamplingParams, seed: int = SEED, sharpness: float = SHARPNESS,
                source: str | None = None) -> np.ndarray:
    """[V]*K array: the probability of every K-token continuation of PROMPT under the sampler `params` (source:
    see context_logits)."""
    logits = context_logits(seed, sharpness, source)
    probs = np.array([[reference_probs(lg, params.temperature, params.top_k, params.top_p) for lg in row]
                      for row in logits])  # [V^(K-1), K, V]
    joint = np.ones([V] * K)
    for i, head in enumerate(itertools.product(range(V), repeat=K - 1)):
        joint[head] = np.prod([probs[i, d, t] for d, t in enumerate(head)]) * probs[i, K - 1]
    return joint


# ---- engine runs --------------------------------------------------------------------------------------------

class Wrapped:
    """A drafter seen through a wrapper: everything not overridden goes to the inner drafter."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Spy(Wrapped):
    """Counts, per step, whether a draft node was accepted and whether drafts were rejected at the node the
    bonus token came from (then the bonus is drawn from a residual, not from p)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.steps = self.drafted = self.accepted = self.rejected = 0

    def observe(self, row, tree, probs, verdict) -> None:
        last = verdict.accepted[-1] if verdict.accepted else 0
        self.steps += 1
        self.drafted += len(tree) > 0
        self.accepted += bool(verdict.accepted)
        self.rejected += bool(tree.children()[last])
        self.inner.observe(row, tree, probs, verdict)


class Skewed(Wrapped):
    """A drafter whose tables learn a distribution unlike the model's: p sharpened by `power` and reweighted by a
    fixed random factor per token (strength `noise`), so its drafts are often wrong (the table is still a
    function of the history, so drafts stay valid draws from the q they record)."""

    def __init__(self, inner, power: float = 2.0, noise: float = 1.0, seed: int = 0):
        super().__init__(inner)
        self.power = power
        self.weight = torch.tensor(np.exp(noise * np.random.default_rng(seed).standard_normal(V)), dtype=torch.float32)

    def skew(self, probs: torch.Tensor | None) -> torch.Tensor | None:
        if probs is None or not len(probs):
            return probs
        w = probs.float() ** self.power * self.weight[: probs.shape[-1]]
        return w / w.sum(-1, keepdim=True)

    def skew_prompt(self, prompt: PromptDists | None, tokens: list[int]) -> PromptDists | None:
        """The same skew (in float32, as skew) on the sparse prompt distributions the engine hands start(), which
        are whole here (top-k >= V); tokens: the prompt's next tokens, whose chances are skewed alike."""
        if prompt is None or not len(prompt):
            return prompt
        w = torch.from_numpy(prompt.probs).float() ** self.power * self.weight[torch.from_numpy(prompt.ids)]
        total = w.sum(-1, keepdim=True)
        own = torch.from_numpy(prompt.token_probs).float() ** self.power * self.weight[torch.tensor(tokens)]
        vals, order = torch.sort(w / total, dim=-1, descending=True, stable=True)
        k = self.inner.prompt_topk()  # the inner drafter's top-k of the skewed distribution
        return PromptDists(np.take_along_axis(prompt.ids, order.numpy(), 1)[:, :k], vals[:, :k].double().numpy(),
                           (own / total[:, 0]).double().numpy())

    def prompt_topk(self) -> int:
        return V  # the whole distribution, to skew it before the inner drafter takes its top-k

    def start(self, row, prompt) -> None:
        self.inner.start(row, self.skew_prompt(prompt, row.prompt[1:]))

    def observe(self, row, tree, probs, verdict) -> None:
        self.inner.observe(row, tree, self.skew(probs), verdict)


class Perturbed(Wrapped):
    """A drafter whose deterministic nodes (one-hot q) get a random token with chance `rate` (its own random
    stream, independent of verification): any such token is a valid deterministic draft. Drawn nodes keep theirs."""

    def __init__(self, inner, rate: float = 0.3, seed: int = 0):
        super().__init__(inner)
        self.rate, self.rng = rate, np.random.default_rng(seed)

    def propose(self, row, max_nodes=None, min_value: float = 0.0) -> DraftTree:
        tree = self.inner.propose(row, max_nodes, min_value)
        out = DraftTree()
        for tok, parent, q, tag in zip(tree.tokens, tree.parents, tree.qs, tree.tags):
            if q is None and self.rng.random() < self.rate:
                tok = int(self.rng.integers(V))
            out.add(tok, parent, q, tag)
        return out


@dataclass
class Run:
    samples: np.ndarray  # [n, K] continuations
    per_step: float  # tokens per step (K: one step per row; 1: plain decoding)
    drafted: float  # share of steps with a draft
    accepted: float  # share of steps that accepted at least one draft node
    rejected: float  # share of steps whose bonus token came from a residual (drafts rejected there)
    drafter: object  # the drafter the engine used (inside the wrappers)

    def __repr__(self) -> str:
        return (f"Run(per_step={self.per_step:.3f}, drafted={self.drafted:.3f}, accepted={self.accepted:.3f}, "
                f"rejected={self.rejected:.3f})")


def engine_run(target, spec: SpecConfig, params: SamplingParams, n: int, batch: int = 250, grid=None,
               wrap=None) -> Run:
    """n continuations from the engine (rows of a batch share one drafter group); wrap(drafter) -> the drafter
    the engine uses (Skewed, Perturbed). grid: a cost grid that sizes every row's tree; None: whole trees."""
    drafter = make_drafter(spec, target.vocab_size, target)  # target: drafters with model tables build them
    spy = Spy(wrap(drafter) if wrap else drafter)
    out, steps = [], 0
    for b in range(n // batch):
        p = SamplingParams(params.temperature, params.top_p, params.top_k, K, seed=1000 + b, ignore_eos=True)
        rows = [Row(PROMPT, p, group=b, index=i) for i in range(batch)]
        Engine(target, spy, grid=grid).run(rows)
        out += [r.generated for r in rows]
        steps += sum(r.stats.steps for r in rows)
    share = 1 / max(spy.steps, 1)
    return Run(np.array(out), len(out) * K / steps, spy.drafted * share, spy.accepted * share, spy.rejected * share,
               drafter)


def engine_samples(target, spec: SpecConfig, params: SamplingParams, n: int, batch: int = 250, grid=None):
    """[n, K] continuations from the engine, and tokens per step."""
    run = engine_run(target, spec, params, n, batch, grid)
    return run.samples, run.per_step


# ---- the cases ----------------------------------------------------------------------------------------------

N = 2000  # samples per check
PLAIN = SamplingParams(temperature=1.0)
TRUNCATED = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)


def params_id(params) -> str:
    return "T1" if params is PLAIN else "T0.7-k5-p0.9"


def skewed(drafter):
    return Skewed(drafter, power=3.0, noise=1.5)


def perturbed(drafter):
    return Perturbed(drafter, rate=0.3)


def skewed_perturbed(drafter):
    return Perturbed(Skewed(drafter, power=3.0, noise=1.5), rate=0.3)


# drafts made wrong on purpose: (method, options, wrapper); tests/test_mutants_power.py runs the first four with
# broken verifiers
WRONG = [
    ("stand", {}, skewed),
    ("stand-dynamic", {}, skewed),
    ("consensus", {"k": 1, "nodes": 6, "fuzzy": 1}, perturbed),  # one-hot siblings
    ("stand+consensus", {"k": 2, "topk": 2}, skewed),  # two stored tokens per context: the grafts get their turn
    ("stand", {"stochastic": False}, skewed_perturbed),
    ("stand", {"refill": True}, skewed),  # refilled siblings continue their parent's draw, under its q
]


def wrong_id(case) -> str:
    method, extra, wrap = case
    return "-".join([method, *map(str, extra.values()), wrap.__name__])


# ---- the test ------------------------------------------------------------------------------------------------

def pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of observed counts against expected probabilities (cells with < 5 expected merged)."""
    idx = np.ravel_multi_index(samples.T, probs.shape) if samples.ndim == 2 else samples
    counts = np.bincount(idx, minlength=probs.size).astype(float)
    expected = probs.ravel() * len(idx)
    small = expected < 5
    f_obs = np.append(counts[~small], counts[small].sum())
    f_exp = np.append(expected[~small], expected[small].sum())
    if f_exp[-1] == 0:
        if f_obs[-1] > 0:  # a continuation the sampler can never give
            return 0.0
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    return float(chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue)


def marginal_pvalues(samples: np.ndarray, joint: np.ndarray) -> dict[str, float]:
    """p-values for the pairs (x1, x2), (x2, x3) and the triple itself."""
    return {
        "x1x2": pvalue(samples[:, :2], joint.sum(2)),
        "x2x3": pvalue(samples[:, 1:], joint.sum(0)),
        "x1x2x3": pvalue(samples, joint),
    }
