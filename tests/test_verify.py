"""Verification on hand-built trees against a synthetic target whose distributions are known exactly."""

import functools
import zlib

import numpy as np
import pytest
import torch

from lossless import pvalue
from stand.core import verify as V
from stand.params import SamplingParams
from stand.core.tree import DraftTree, SparseDist, graft

VOCAB = 6
TRIALS = 8000


@functools.lru_cache(maxsize=None)
def target_dist(context: tuple) -> np.ndarray:
    """A fixed, peaky distribution per context (the synthetic target)."""
    rng = np.random.default_rng(abs(hash(context)) % (2**32))
    return rng.dirichlet(np.full(VOCAB, 0.5))


@functools.lru_cache(maxsize=None)
def draft_dist(context: tuple) -> SparseDist:
    """A draft distribution unlike the target's, over 4 of the 6 tokens."""
    rng = np.random.default_rng(zlib.crc32(repr(("q",) + context).encode()))  # stable across processes
    ids = rng.choice(VOCAB, 4, replace=False)
    return SparseDist(ids, rng.dirichlet(np.ones(4)))


def draw_without_replacement(q: SparseDist, m: int, rng) -> list[int]:
    """Gumbel-Top-K: m distinct tokens in draw order."""
    keys = np.log(q.probs) + rng.gumbel(size=len(q.probs))
    return q.ids[np.argsort(-keys)[:m]].tolist()


def stochastic_tree(rng, widths=(3, 2)) -> DraftTree:
    """Root has widths[0] children drawn from q(root); each of them widths[1] children from q(child)."""
    tree = DraftTree()
    q0 = draft_dist(())
    for tok in draw_without_replacement(q0, widths[0], rng):
        i = tree.add(tok, -1, q0)
        q1 = draft_dist((tok,))
        for tok2 in draw_without_replacement(q1, widths[1], rng):
            tree.add(tok2, i, q1)
    return tree


def deterministic_tree(rng) -> DraftTree:
    """Fixed one-hot drafts: two root children, a chain of depth 3 under the first."""
    tree = DraftTree()
    a = tree.add(2, -1)
    tree.add(4, -1)
    b = tree.add(1, a)
    tree.add(5, b)
    return tree


def mixed_tree(rng) -> DraftTree:
    """A deterministic child first, then stochastic siblings, with a stochastic grandchild level."""
    tree = DraftTree()
    tree.add(3, -1)
    q0 = draft_dist(())
    for tok in draw_without_replacement(q0, 2, rng):
        i = tree.add(tok, -1, q0)
        q1 = draft_dist((tok,))
        tree.add(draw_without_replacement(q1, 1, rng)[0], i, q1)
    return tree


def node_probs(tree: DraftTree) -> torch.Tensor:
    """[M+1, V] the target's distribution at the root and every node."""
    paths = [()]
    for tok, par in zip(tree.tokens, tree.parents):
        paths.append(paths[par + 1] + (tok,))
    return torch.tensor(np.stack([target_dist(p) for p in paths]), dtype=torch.float32)


def two_tokens(tree_fn, verifier, trials: int, seed: int = 0) -> np.ndarray:
    """[trials, 2]: the first two tokens, plain sampling from the target after the step if it gave one."""
    rng = np.random.default_rng(seed)
    out = np.zeros((trials, 2), dtype=np.int64)
    for t in range(trials):
        tree = tree_fn(rng)
        toks = verifier(tree, node_probs(tree), rng).tokens(tree)[:2]
        if len(toks) < 2:
            p = target_dist(tuple(toks))
            toks.append(int(rng.choice(VOCAB, p=p / p.sum())))
        out[t] = toks
    return out


def exact_two() -> np.ndarray:
    """[V, V] the target's probability of every first two tokens."""
    p1 = target_dist(())
    p1 = p1 / p1.sum()
    return np.stack([p1[a] * target_dist((a,)) / target_dist((a,)).sum() for a in range(VOCAB)])


def broken_no_residual(tree, probs, rng):
    """A classic bug: after rejecting drafts, sample the bonus from p instead of the residual."""
    kids = tree.children()
    node, accepted = 0, []
    while True:
        p = probs[node].double().numpy()
        nxt = None
        drawn = {}
        for c in kids[node]:
            tok, q = tree.tokens[c - 1], tree.qs[c - 1]
            ids, qp = V._proposal(q, tok, drawn.setdefault(id(q), []))
            drawn[id(q)].append(tok)
            if rng.random() * qp[ids == tok][0] < p[tok]:
                nxt = c
                break
        if nxt is None:
            return V.Verdict(accepted, int(rng.choice(len(p), p=p / p.sum())))
        accepted.append(nxt)
        node = nxt


def broken_accept_with_q(tree, probs, rng):
    """Another bug: accept a draft with probability q(x) instead of min(1, p(x)/q(x))."""
    kids = tree.children()
    node, accepted = 0, []
    while True:
        p = probs[node].double().numpy().copy()
        nxt = None
        for c in kids[node]:
            tok, q = tree.tokens[c - 1], tree.qs[c - 1]
            qx = 1.0 if q is None else q.probs[q.ids == tok][0]
            if rng.random() < qx * p[tok] / p.sum() * 2:
                nxt = c
                break
            p[tok] = 0.0
        if nxt is None:
            return V.Verdict(accepted, int(rng.choice(len(p), p=p / p.sum())))
        accepted.append(nxt)
        node = nxt


TREES = {"stochastic": stochastic_tree, "deterministic": deterministic_tree, "mixed": mixed_tree}


@pytest.mark.parametrize("shape", TREES)
def test_recursive_rejection_is_exact(shape):
    samples = two_tokens(TREES[shape], V.verify_sample, trials=TRIALS)
    assert pvalue(samples, exact_two()) > 1e-4


@pytest.mark.parametrize("broken", [broken_no_residual, broken_accept_with_q])
@pytest.mark.parametrize("shape", ["stochastic", "mixed"])
def test_a_broken_verifier_is_caught(shape, broken):
    """The statistical test has the power to see a wrong rule: keep it able to fail."""
    samples = two_tokens(TREES[shape], broken, trials=TRIALS)
    assert pvalue(samples, exact_two()) < 1e-6


def prefix_cut(tree: DraftTree, widths: dict[int, int]) -> DraftTree:
    """tree with every node's children cut to its first widths[node] (root-0 indexing; default all) in draw order."""
    kids = tree.children()
    keep = np.zeros(len(tree), dtype=bool)
    stack = [0]
    while stack:
        node = stack.pop()
        for c in kids[node][: widths.get(node, len(kids[node]))]:
            keep[c - 1] = True
            stack.append(c)
    return tree.subtree(keep)


def test_a_larger_tree_never_accepts_less():
    """A tree that holds a smaller one (each node's children a prefix of its own, in draw order) accepts at least as
    many tokens for the same draws and the same verifier randomness; so, on average, a larger cut of a template
    cannot accept less (a check that the verifier walks siblings in draw order and keeps the residual)."""
    rng = np.random.default_rng(3)
    gained = 0
    for t in range(2000):
        big = stochastic_tree(rng, widths=(4, 3))
        small = prefix_cut(big, {0: 2, 1: 1, 2: 0, 5: 1})
        assert len(small) < len(big)
        a_big = len(V.verify_sample(big, node_probs(big), np.random.default_rng(t)).accepted)
        a_small = len(V.verify_sample(small, node_probs(small), np.random.default_rng(t)).accepted)
        assert a_big >= a_small
        gained += a_big - a_small
    assert gained > 100


def test_greedy_follows_argmax():
    tree = DraftTree()
    a = tree.add(5, -1)
    b = tree.add(3, -1)
    tree.add(1, b)
    tree.add(2, a)
    logits = torch.full((5, VOCAB), -1.0)
    logits[0, 3] = 1  # root -> 3 (node 2)
    logits[2, 1] = 1  # node 2 -> 1 (node 3)
    logits[3, 0] = 1  # node 3 -> bonus 0
    verdict = V.verify(tree, logits, SamplingParams(), np.random.default_rng(0))
    assert verdict.accepted == [2, 3] and verdict.bonus == 0
    assert verdict.tokens(tree) == [3, 1, 0]


def test_sampler_probs_truncation():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    p = V.sampler_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    assert (p[0, 3:] == 0).all() and torch.allclose(p.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)[0]
    p = V.sampler_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    keep = (torch.cumsum(full, 0) - full) < 0.7
    assert torch.allclose(p[0], torch.where(keep, full, 0) / full[keep].sum())


def test_tree_helpers():
    tree = DraftTree.chain([4, 5, 6])
    assert tree.depths().tolist() == [1, 2, 3]
    assert len(tree.clip(2)) == 2 and len(tree.clip(0)) == 0
    a = tree.ancestor_matrix()
    assert a[3].tolist() == [True, True, True, True] and a[1].tolist() == [True, True, False, False]
    dup = DraftTree()
    x = dup.add(1, -1)
    dup.add(2, x)
    y = dup.add(1, -1)
    dup.add(3, y)
    merged, _ = graft(DraftTree(), dup)  # deterministic siblings with equal tokens merge
    assert merged.tokens == [1, 2, 3] and merged.parents == [-1, 0, 0]
