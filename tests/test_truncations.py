"""The edges the lossless checks do not reach on their own: where a row ends (Row.append: end-of-sequence, length),
how far a draft may reach (Row.room, DraftTree.clip, prefix and max_leaves, the engine's cuts to the context and to
the pass's share, Engine._fit), and the verifier's fallbacks for rounding (a residual that vanished, a draw past the
end of a cumulative sum). scripts/mutants.sh breaks each of them; these fast tests notice."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from stand.core.sequence import Row
from stand.core.tree import DraftTree, SparseDist, graft
from stand.core.verify import _pick, verify_sample
from stand.drafters.none import NoDrafter
from stand.engine import Engine
from stand.params import SamplingParams, SpecConfig
from test_stop_in_draft import Oracle

NO_TEXT = lambda ids: ""  # noqa: E731


def test_row_append_ends_at_eos_unless_ignored():
    row = Row([1], SamplingParams(max_new_tokens=10))
    assert row.append([5, 9, 6], {9}, 100, NO_TEXT) == [5, 9] and row.finish_reason == "stop"
    row = Row([1], SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert row.append([5, 9, 6], {9}, 100, NO_TEXT) == [5, 9, 6] and not row.done


def test_row_append_ends_at_max_new_tokens():
    row = Row([1], SamplingParams(max_new_tokens=3))
    assert row.append([5, 6], set(), 100, NO_TEXT) == [5, 6] and not row.done
    assert row.append([7, 8, 9], set(), 100, NO_TEXT) == [7]
    assert (row.finish_reason, row.stats.new_tokens, row.generated) == ("length", 3, [5, 6, 7])


def test_row_room_leaves_the_bonus_token():
    row = Row([1, 2, 3], SamplingParams(max_new_tokens=10))
    assert row.room(100) == 9  # ten new tokens: nine drafted, one bonus
    assert row.room(8) == 4  # a context of 8 holds five more: four drafted
    row.append([4] * 4, set(), 100, NO_TEXT)
    assert (row.room(100), row.room(8)) == (5, 0)


def test_tree_cuts_by_depth_prefix_and_leaves():
    tree = DraftTree()
    a = tree.add(1, -1)
    c = tree.add(3, a)
    tree.add(4, c)
    tree.add(2, -1)  # parents [-1, 0, 1, -1]: a chain of three, then a second root child
    assert [len(tree.clip(d)) for d in range(4)] == [0, 2, 3, 4]
    assert tree.prefix(2).tokens == [1, 3] and tree.prefix(0).tokens == [] and len(tree.prefix(9)) == 4
    assert tree.max_leaves(1).tokens == [1, 3, 4] and len(tree.max_leaves(2)) == 4


def test_graft_follows_the_first_equal_node_and_adds_after_it():
    """The consensus chain 1 -> 2 -> 7 grafted onto a STAND tree [9, 1 -> 2, 1]: it follows the first node 1 and its
    child 2, and only 7 is new, added last (the verifier tries a grafted node after the siblings it joins)."""
    base = DraftTree()
    base.add(9, -1)
    one = base.add(1, -1)
    two = base.add(2, one)
    base.add(1, -1)
    tree, added = graft(base, DraftTree.chain([1, 2, 7]), tag=-2)
    assert added == 1 and tree.tokens == [9, 1, 2, 1, 7] and tree.parents == [-1, -1, one, -1, two]
    assert tree.tags[-1] == -2


def bushy(leaves: int) -> DraftTree:
    """A root child with `leaves` children, then one more node below the first of them."""
    tree = DraftTree()
    top = tree.add(1, -1)
    first = tree.add(2, top)
    for t in range(3, 2 + leaves):
        tree.add(t, top)
    tree.add(9, first)
    return tree


def test_engine_fit_holds_a_pass_to_the_backend():
    """max_sequences 6 over 2 rows: each row its own sequence plus two leaves more (3 leaves); max_pass_tokens 12:
    5 nodes and a root per row."""
    engine = Engine.__new__(Engine)
    engine.parked = {}  # no row of a held group keeps sequences
    engine.target = SimpleNamespace(max_sequences=6, max_pass_tokens=None)
    fitted = engine._fit([bushy(4), bushy(4)])
    assert [len(t) for t in fitted] == [4, 4]  # the first three leaves' nodes: top, 2, 3, 4
    engine.target = SimpleNamespace(max_sequences=None, max_pass_tokens=12)
    assert [len(t) for t in engine._fit([bushy(6), bushy(6)])] == [5, 5]


def test_drafts_stop_at_the_context_end(tiny):
    """A row near the end of the context (512 tokens) whose long drafts are all accepted fills it exactly."""
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = Engine(tiny, NoDrafter(SpecConfig(), tiny.vocab_size)).run([Row([7] * 490, params)])[0]
    rows = [Row([7] * 490, params) for _ in range(2)]
    Engine(tiny, Oracle(plain.generated, k=16)).run(rows)
    assert [len(r.tokens) for r in rows] == [512, 512] and rows[0].generated == plain.generated
    assert rows[0].stats.steps < len(plain.generated)  # the drafts were accepted


def test_a_pass_carries_at_most_step_tokens(tiny):
    sizes = []
    target = SimpleNamespace(**{k: getattr(tiny, k) for k in ("vocab_size", "max_len", "eos_ids", "decode", "pads",
                                                              "max_sequences", "max_pass_tokens")})

    def new_cache():
        cache = tiny.new_cache()
        step = cache.step
        cache.step = lambda trees, roots, width=None: (sizes.append(sum(len(t) + 1 for t in trees)),
                                                      step(trees, roots, width))[1]
        return cache

    target.new_cache = new_cache
    rows = [Row([5, 6, 7, i], SamplingParams(max_new_tokens=12, ignore_eos=True)) for i in range(4)]
    Engine(target, Oracle([7] * 64, k=16), step_tokens=12).run(rows)
    assert max(sizes) == 12  # four rows of a root and two drafted tokens each


class Rejecting:
    """An rng whose every number is the largest below 1: a draft whose acceptance chance is under 1 is rejected."""

    def random(self) -> float:
        return 1.0 - 2.0**-53


def test_residual_fallback_never_draws_a_rejected_draft():
    """q equal to p up to rounding, the draft rejected anyway: the residual is zero up to rounding, so the bonus
    comes from p less the rejected draft (here the last token, which a draw at the top of the range would hit)."""
    probs = torch.tensor([[0.5, 0.0, 0.0, 0.5]], dtype=torch.float64)
    tree = DraftTree()
    tree.add(3, -1, SparseDist(np.array([3, 0]), np.array([0.5 + 1e-14, 0.5 - 1e-14])))
    verdict = verify_sample(tree, torch.cat([probs, probs]), Rejecting())
    assert verdict.accepted == [] and verdict.bonus == 0


def test_a_draw_past_the_end_of_the_sum_takes_the_last_token_with_mass():
    c = np.cumsum([0.5, 0.5, 0.0, 0.0])
    assert [_pick(c, u) for u in (0.2, 0.7, 1.0, 1.0 + 1e-12)] == [0, 1, 1, 1]
