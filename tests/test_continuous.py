"""Continuous batching: rows join a running batch at step boundaries and leave when done, on every backend;
each row's output is what it gives alone."""

from __future__ import annotations

import importlib.util

import pytest

from stand.api import make_engine
from stand.backends.lean import with_forward
from stand.core.sequence import Row
from stand.params import SamplingParams, SpecConfig
from tiny import byte_tokenizer, save_tiny_gguf, tiny_target

BACKENDS = ["hf", "lean"] + (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else [])


@pytest.fixture(scope="module", params=BACKENDS)
def target(request, tmp_path_factory):
    if request.param == "llama.cpp":
        from stand.backends.llamacpp import LlamaCppModel

        return LlamaCppModel(save_tiny_gguf(str(tmp_path_factory.mktemp("g") / "t.gguf")), byte_tokenizer())
    return with_forward(tiny_target(), request.param)


def row(text: bytes, tokens: int, temperature: float = 0.0) -> Row:
    return Row(list(text), SamplingParams(temperature=temperature, max_new_tokens=tokens, seed=3, ignore_eos=True))


def alone(target, method: str, r: Row) -> list[int]:
    fresh = Row(r.prompt, r.params)
    make_engine(target, SpecConfig(method=method)).run([fresh])
    return fresh.generated


@pytest.mark.parametrize("method", ["none", "stand", "pld"])
def test_rows_join_a_running_batch(target, method):
    long, short, one = row(b"the cat sat on the mat. the cat sat", 40), row(b"abc abc abc", 6), row(b"x", 5)
    engine = make_engine(target, SpecConfig(method=method))
    engine.add([long])
    ended: list[Row] = []
    for _ in range(3):
        ended += engine.step()
    assert long.stats.new_tokens > 0 and not long.done
    engine.add([short, one])  # join mid-flight: a 1-token prompt has nothing to prefill
    while engine.busy:
        ended += engine.step()
    assert ended.index(short) < ended.index(long) and ended.index(one) < ended.index(long)
    for r in (long, short, one):
        assert r.generated == alone(target, method, r), r.prompt


def test_sequential_samples_share_a_table_as_one_run(target):
    """max_live=1: rows decode one after another through the same engine, the later drafting from the earlier."""
    rows = [Row(list(b"the cat sat on the mat"), SamplingParams(max_new_tokens=30), group=0, index=j) for j in range(3)]
    engine = make_engine(target, SpecConfig(method="stand"))
    engine.run(rows, max_live=1)
    assert all(r.generated == rows[0].generated for r in rows)  # greedy: the same text
    assert rows[2].stats.mean_accepted > rows[0].stats.mean_accepted  # drafted from the earlier samples
    assert not engine.drafter.tables  # the group's table is gone once its last row ended


def test_prompt_distributions_arrive_in_bounded_chunks(target, monkeypatch):
    """A long prompt reaches the drafter as sparse top-k per position, computed PREFILL_CHUNK positions at a time."""
    from stand.backends.protocol import PREFILL_CHUNK
    from stand.core.drafter import PromptDists

    sizes = []
    real = PromptDists.fill
    monkeypatch.setattr(PromptDists, "fill", lambda self, start, probs, nxt: (sizes.append(len(probs)),
                                                                               real(self, start, probs, nxt)))
    prompt = list(b"the cat sat on the mat. " * 17)  # 408 tokens: two chunks
    r = Row(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine = make_engine(target, SpecConfig(method="stand"))
    engine.run([r])
    assert max(sizes) <= PREFILL_CHUNK and sum(sizes) == len(prompt) - 1
    assert r.generated == alone(target, "none", r)
