"""The suffix drafter (SuffixDecoding on arctic-inference's suffix trees): its trees, one cache per group so samples
draft from each other, greedy output equal to plain greedy decoding. The exact-distribution checks are in
tests/test_lossless_engine.py with every other drafter."""

from __future__ import annotations


import pytest
from extras import require

from stand.core.sequence import Row
from stand.core.tree import DraftTree
from stand.core.verify import Verdict
from stand.drafters.registry import make_drafter
from stand.engine import Engine
from stand.errors import StandError
from stand.params import SamplingParams, SpecConfig

require("arctic_inference")

from stand.drafters.suffix import SuffixDrafter, as_tree  # noqa: E402


def drafter(**options) -> SuffixDrafter:
    return make_drafter(SpecConfig(method="suffix", options=options), 300)


def commit(d: SuffixDrafter, row: Row, tokens: list[int]) -> None:
    d.observe(row, DraftTree.chain(tokens[:-1]), None, Verdict(list(range(1, len(tokens))), tokens[-1]))
    row.tokens += tokens


def test_arctic_drafts_become_one_hot_trees_cut_by_estimate_and_size():
    tree = as_tree([7, 8, 9, 4], [-1, 0, 0, 2], [0.9, 0.5, 0.3, 0.2], min_prob=0.25, limit=10)
    assert (tree.tokens, tree.parents, tree.qs) == ([7, 8, 9], [-1, 0, 0], [None] * 3)
    assert as_tree([7, 8, 9, 4], [-1, 0, 0, 2], [0.9, 0.5, 0.3, 0.2], 0.0, 2).tokens == [7, 8]


def test_samples_of_a_question_draft_from_each_other():
    d = drafter()
    prompt = [1, 2, 3]
    ahead, behind = Row(prompt, SamplingParams(), group=4), Row(prompt, SamplingParams(), group=4)
    other = Row(prompt, SamplingParams(), group=5)  # another question
    for r in (ahead, behind, other):
        d.start(r)
    commit(d, ahead, [40, 41, 42, 43, 44, 45])
    commit(d, behind, [40, 41])
    commit(d, other, [40, 41])
    assert d.propose(behind).tokens[:2] == [42, 43]  # a match of 2 tokens drafts up to 2 (max_spec_factor 1)
    assert len(d.propose(other)) == 0  # its cache never saw the other group's text
    for r in (ahead, behind, other):
        d.finish(r)
    assert not d.caches


def test_shared_cache_across_prompts():
    d = make_drafter(SpecConfig(method="suffix", share_across_prompts=True), 300)
    a, b = Row([1, 2, 3], SamplingParams(), group=0), Row([9, 9], SamplingParams(), group=1)
    d.start(a)
    d.start(b)
    commit(d, a, [50, 51, 52, 53, 54])
    commit(d, b, [50, 51])
    assert d.propose(b).tokens[:2] == [52, 53]


@pytest.mark.parametrize("options", [{}, {"tree": False}, {"nodes": 4}])
def test_greedy_equals_plain_greedy(tiny, options):
    prompts = [tiny.encode(p) for p in ["abcabcabc abc", "one two one two one"]]

    def run(method, **opts):
        rows = [Row(p, SamplingParams(max_new_tokens=48), group=g, index=i) for g, p in enumerate(prompts)
                for i in range(3)]
        Engine(tiny, make_drafter(SpecConfig(method=method, options=opts), tiny.vocab_size)).run(rows)
        return rows

    plain, ours = run("none"), run("suffix", **options)
    assert [r.generated for r in ours] == [r.generated for r in plain]
    assert sum(r.stats.steps for r in ours) < sum(r.stats.steps for r in plain)  # drafts were accepted


def test_missing_arctic_inference_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_arctic(name, *args, **kwargs):
        if name.startswith("arctic_inference"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_arctic)
    with pytest.raises(StandError, match="needs arctic-inference"):
        drafter()


def test_shared_drafter_state_is_bounded():
    """A shared cache (a server's --share-table) keeps the responses of at most max_cached_requests rows."""
    d = make_drafter(SpecConfig(method="suffix", share_across_prompts=True, options={"max_cached_requests": 8}), 300)
    for i in range(40):
        row = Row([1, 2, 3, i % 7], SamplingParams())
        d.start(row)
        commit(d, row, [4, 5, 6 + i % 5])
        d.finish(row)
    assert 0 < len(d.caches["shared"].cached_requests) <= 8
