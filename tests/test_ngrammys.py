"""N-Grammys: the model bigram table and its cache, the draft strategies, the trie, lossless greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stand.drafters.registry import make_drafter
from stand.drafters.ngrammys import (NGrammys, build_tables, context_drafts, mix_drafts,
                                     model_tables, table_path, trie)
from stand.core.sequence import Row
from stand.engine import Engine
from stand.errors import StandError
from stand.params import SamplingParams, SpecConfig
from tiny import tiny_target


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def tables(target):
    return build_tables(target, k=5, chunk=40, progress=False)  # 259 tokens: several chunks, a short last one


def test_bigram_table_is_the_models_own_topk(target, tables):
    V = target.vocab_size
    assert tables.bigram.shape == (V, 5)
    for v in [0, 1, 39, 40, 97, 200, V - 1]:
        with torch.no_grad():
            p = torch.softmax(target.model(input_ids=torch.tensor([[v]])).logits[0, -1].float(), -1)
        top = torch.topk(p, 5)
        assert tables.bigram[v].tolist() == top.indices.tolist()
        np.testing.assert_allclose(tables.bigram_probs[v], top.values.numpy(), rtol=1e-5)


def test_unigram_is_the_top_of_the_mean_distribution(target, tables):
    with torch.no_grad():
        p = torch.softmax(target.model(input_ids=torch.arange(target.vocab_size)[:, None]).logits[:, -1].float(), -1)
    assert tables.unigram.tolist() == torch.topk(p.mean(0), 5).indices.tolist()


def test_tables_are_cached_on_disk_by_model_identity(target, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_CACHE", str(tmp_path))
    path = table_path(target, 4)
    assert path.startswith(str(tmp_path))
    built = model_tables(target, k=4, progress=False)
    assert (tmp_path / path.split("/")[-1]).exists()
    loaded = model_tables(target, k=4, progress=False)
    assert np.array_equal(built.bigram, loaded.bigram) and np.array_equal(built.unigram, loaded.unigram)
    other = tiny_target(seed=1)
    assert other.fingerprint() != target.fingerprint()  # other weights: another file
    (tmp_path / path.split("/")[-1]).write_bytes(b"not a table")
    with pytest.raises(StandError, match="delete it to rebuild"):
        model_tables(target, k=4, progress=False)


def test_context_drafts_use_several_matches_longest_first():
    toks = np.array([1, 2, 3, 9, 7, 2, 3, 8, 5, 4, 3, 6, 1, 2, 3])
    # suffix (1, 2, 3) occurs at 0 -> continuation 9 7; (2, 3) also at 5 -> 8 5; (3,) also at 10 -> 6 1
    assert context_drafts(toks, 3, 2, 8) == [[9, 7], [8, 5], [6, 1]]
    assert context_drafts(toks, 3, 2, 2) == [[9, 7], [8, 5]]
    assert context_drafts(np.array([4, 5, 6]), 3, 2, 8) == []


def test_mix_fills_the_slots_with_distinct_first_tokens(tables):
    toks = np.array([1, 2, 3, 9, 7, 2, 3, 8, 5, 4, 3, 6, 1, 2, 3])
    drafts = mix_drafts(toks, tables, slots=6, length=6, max_n=3)
    assert len(drafts) == 6
    assert all(len(d) == 6 for d in drafts)
    assert drafts[0] == [9, 7, 2, 3, 8, 5] and drafts[1] == [8, 5, 4, 3, 6, 1]
    b = tables.bigram[3, 0]
    assert drafts[2] == [6, 1, 2, 3, b, tables.bigram[b, 0]]  # a short context draft, extended by bigrams
    firsts = [d[0] for d in drafts]
    assert len(set(firsts)) == len(firsts)
    succ = [t for t in tables.bigram[3].tolist() if t not in (9, 8, 6)]
    assert firsts[3:] == succ[:3]  # then the bigram successors of the last token, best first
    assert drafts[3][1] == tables.bigram[drafts[3][0], 0]
    no_model = mix_drafts(toks, None, slots=5, length=4, max_n=3)
    # up to half the slots from the context, then the unigram fallback: the row's most frequent tokens
    assert no_model == [[9, 7, 2, 3], [8, 5, 4, 3], [3], [2], [1]]


def test_trie_shares_prefixes():
    tree = trie([[1, 2, 3], [1, 2, 4], [5], [1, 6]])
    assert tree.tokens == [1, 2, 3, 4, 5, 6]
    assert tree.parents == [-1, 0, 1, 1, -1, 0]
    assert all(q is None for q in tree.qs)


def test_make_drafter_prepares_the_tables(target, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_CACHE", str(tmp_path))
    drafter = make_drafter(SpecConfig(method="ngrammys"), target.vocab_size, target)
    assert drafter.tables is not None and drafter.tables.vocab_size == target.vocab_size
    with pytest.raises(StandError, match="tables cover"):
        NGrammys(SpecConfig(method="ngrammys"), 100, drafter.tables)


@pytest.mark.parametrize("with_tables", [True, False])
def test_greedy_ngrammys_equals_plain_greedy(target, tables, with_tables):
    prompt = target.encode("hello hello world")
    def run(drafter):
        rows = [Row(list(prompt), SamplingParams(max_new_tokens=40), group=0, index=i) for i in range(3)]
        return Engine(target, drafter).run(rows)
    plain = run(make_drafter(SpecConfig(method="none"), target.vocab_size))
    drafter = NGrammys(SpecConfig(method="ngrammys"), target.vocab_size, tables if with_tables else None)
    ngr = run(drafter)
    for a, b in zip(plain, ngr):
        assert a.tokens == b.tokens
    assert sum(r.stats.steps for r in ngr) < sum(r.stats.steps for r in plain)


@pytest.mark.slow
def test_real_model_greedy_equals_plain(real_f32):
    """2 prompts x 64 tokens, N=4 rows per prompt, with the real model's bigram table (built once, cached)."""
    prompts = [real_f32.encode(p) for p in ["What is 17 * 23? Think step by step.",
                                              "Write a Python function that reverses a string."]]
    plain = Engine(real_f32, make_drafter(SpecConfig(method="none"), real_f32.vocab_size)).run(
        [Row(list(p), SamplingParams(max_new_tokens=64), group=g) for g, p in enumerate(prompts)])
    drafter = make_drafter(SpecConfig(method="ngrammys"), real_f32.vocab_size, real_f32)
    rows = [Row(list(p), SamplingParams(max_new_tokens=64), group=g, index=i)
            for g, p in enumerate(prompts) for i in range(4)]
    for r in Engine(real_f32, drafter).run(rows):
        assert r.tokens == plain[r.group].tokens
        assert r.stats.mean_accepted > 1.0
