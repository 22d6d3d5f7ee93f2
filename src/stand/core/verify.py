"""Lossless verification of a draft tree against the target's distributions.

Greedy: follow the child equal to the target's argmax. Sampling: recursive rejection sampling
over each visited node's children, in draw order (STAND, arXiv 2506.04708); a bonus token ends it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stand.params import SamplingParams
from stand.core.tree import DraftTree, SparseDist


@dataclass
class Verdict:
    accepted: list[int]  # accepted draft nodes in root-0 indexing, root excluded, in path order
    bonus: int  # the token drawn at the last accepted node

    def tokens(self, tree: DraftTree) -> list[int]:
        return [tree.tokens[i - 1] for i in self.accepted] + [self.bonus]


def sampler_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities the sampler draws from.

    Temperature, then top-k, then top-p (the smallest set whose mass reaches top_p).
    Greedy (T=0) gives softmax at T=1, the distribution the drafters learn from.
    """
    x = logits.float()
    if params.temperature > 0:
        x = x / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def verify_greedy(tree: DraftTree, argmax: list[int]) -> Verdict:
    """argmax: [M+1] the target's argmax at every node (root-0 indexing)."""
    kids = tree.children()
    node, accepted = 0, []
    while True:
        nxt = next((c for c in kids[node] if tree.tokens[c - 1] == argmax[node]), None)
        if nxt is None:
            return Verdict(accepted, int(argmax[node]))
        accepted.append(nxt)
        node = nxt


DRAW_BLOCK = 256  # tokens per block of the two-level search in _draw


def _pick(c: np.ndarray, u: float) -> int:
    """The index i with c[i-1] <= u < c[i] in a cumulative sum c; rounding past the end: the last step of c."""
    i = int(np.searchsorted(c, u, side="right"))
    if i < len(c):
        return i
    return int(np.flatnonzero(np.diff(c, prepend=0.0) > 0)[-1])


def _draw(p: np.ndarray, total: float, rng: np.random.Generator) -> int:
    """One token from unnormalised p (float64 [V]) whose sum is total: inverse-CDF sampling in two levels (the
    block, then the token in it), so only V / DRAW_BLOCK + DRAW_BLOCK numbers are summed in sequence."""
    blocks = np.cumsum(np.add.reduceat(p, np.arange(0, len(p), DRAW_BLOCK)))  # [ceil(V / DRAW_BLOCK)]
    u = rng.random() * blocks[-1]
    k = _pick(blocks, u)
    inner = np.cumsum(p[k * DRAW_BLOCK:(k + 1) * DRAW_BLOCK])  # [DRAW_BLOCK]
    return k * DRAW_BLOCK + _pick(inner, u - (blocks[k - 1] if k else 0.0))


def _proposal(q: SparseDist | None, token: int, drawn: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The conditional proposal a child was drawn from: q less the siblings drawn before it."""
    if q is None:
        return np.array([token]), np.array([1.0])
    keep = ~np.isin(q.ids, drawn)
    probs = q.probs[keep]
    return q.ids[keep], probs / probs.sum()


def residual(p: np.ndarray, total: float, ids: np.ndarray, qp: np.ndarray, base: torch.Tensor,
             rejected: list[int]) -> np.ndarray:
    """p (float64 [V], unnormalised, summing to total) after a draft drawn from qp over ids was rejected: the residual
    max(p - q, 0), in place; where p was q up to rounding, base (the node's distribution) less the rejected drafts."""
    p[ids] = np.maximum(p[ids] / total - qp, 0.0) * total
    if p.sum() > 1e-12 * total:
        return p
    p = base.double().numpy().copy()
    p[rejected] = 0.0
    return p


def verify_sample(tree: DraftTree, probs: torch.Tensor, rng: np.random.Generator) -> Verdict:
    """probs: [M+1, V] the target's sampler distribution at every node (root-0 indexing)."""
    kids = tree.children()
    node, accepted = 0, []
    while True:
        p = probs[node].double().numpy().copy()  # [V], becomes the residual
        drawn_from: dict[int, list[int]] = {}  # id(q) -> tokens already drawn from it
        nxt = None
        for c in kids[node]:
            tok, q = tree.tokens[c - 1], tree.qs[c - 1]
            drawn = drawn_from.setdefault(id(q), [])
            ids, qp = _proposal(q, tok, drawn)
            drawn.append(tok)
            total = p.sum()
            q_tok = qp[ids == tok][0]
            if rng.random() * q_tok < p[tok] / total:  # accept with min(1, p(x)/q(x))
                nxt = c
                break
            rejected = [tree.tokens[k - 1] for k in kids[node][: kids[node].index(c) + 1]]
            p = residual(p, total, ids, qp, probs[node], rejected)
        if nxt is None:
            return Verdict(accepted, _draw(p, p.sum(), rng))
        accepted.append(nxt)
        node = nxt


def verify(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
           rng: np.random.Generator, probs: torch.Tensor | None = None) -> Verdict:
    """logits: [M+1, V] the target's logits at the root and every draft node."""
    if params.greedy:
        return verify_greedy(tree, logits.argmax(-1).tolist())
    if probs is None:
        probs = sampler_probs(logits, params)
    return verify_sample(tree, probs, rng)
