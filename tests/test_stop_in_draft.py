"""Stop strings inside an accepted draft: a row that meets a stop string in the middle of a multi-token step keeps
exactly what plain decoding keeps (token ids, usage, the KV cache, the finish reason), even when max_new_tokens
falls in the same step. An oracle drafter proposes the plain greedy continuation, so every draft is accepted."""

from __future__ import annotations

import pytest

from stand.core.drafter import Drafter
from stand.core.sequence import Row
from stand.core.tree import DraftTree
from stand.drafters.none import NoDrafter
from stand.engine import Engine
from stand.params import SamplingParams, SpecConfig

PROMPT = [72, 101, 108, 108, 111, 32]  # "Hello "


class Oracle(Drafter):
    """Drafts the next `k` tokens of a known continuation of PROMPT (all accepted under greedy decoding)."""

    def __init__(self, continuation: list[int], k: int = 8):
        super().__init__(SpecConfig(method="none"), 0)
        self.continuation, self.k = continuation, k

    def propose(self, row, max_nodes=None, min_value=0.0) -> DraftTree:
        done = len(row.tokens) - len(row.prompt)
        return DraftTree.chain(self.continuation[done:done + self.k])


class Recorded:
    """The target, its caches noting the KV length of row 0 after every commit."""

    def __init__(self, target):
        self.target, self.kv = target, []

    def __getattr__(self, name):
        return getattr(self.target, name)

    def new_cache(self):
        cache = self.target.new_cache()
        commit = cache.commit
        cache.commit = lambda paths: (commit(paths), self.kv.append(cache.lengths[0]))[0]
        return cache


def decode_rows(tiny, drafter, params: SamplingParams) -> tuple[Row, list[int]]:
    """The row decoded alone, and the KV length the engine's cache held for it after every commit."""
    target = Recorded(tiny)
    row = Row(PROMPT, params)
    Engine(target, drafter).run([row])
    return row, target.kv


@pytest.fixture(scope="module")
def reference(tiny):
    row, _ = decode_rows(tiny, NoDrafter(SpecConfig(), tiny.vocab_size), SamplingParams(max_new_tokens=40, ignore_eos=True))
    return row.generated


@pytest.mark.parametrize("spare", [30, 2, 0])  # max_new_tokens this many tokens past the stop: 0 = the same token
def test_stop_string_inside_an_accepted_draft_accounts_as_plain_decoding(tiny, reference, spare):
    text = tiny.decode(reference)
    stop = text[12:14]
    plain_row, _ = decode_rows(tiny, NoDrafter(SpecConfig(), tiny.vocab_size), SamplingParams(stop=[stop]))
    stopped_at = len(plain_row.generated)
    params = SamplingParams(max_new_tokens=stopped_at + spare, stop=[stop], ignore_eos=True)
    plain, plain_kv = decode_rows(tiny, NoDrafter(SpecConfig(), tiny.vocab_size), params)
    fast, fast_kv = decode_rows(tiny, Oracle(reference), params)
    assert fast.stats.steps < plain.stats.steps  # drafts were accepted: several tokens a step
    assert fast.generated == plain.generated and len(plain.generated) == stopped_at
    assert (fast.finish_reason, fast.text, fast.stats.new_tokens) == (plain.finish_reason, plain.text, stopped_at)
    assert fast.finish_reason == "stop" and fast.text == text[:12]
    assert fast_kv[-1] == plain_kv[-1] == len(PROMPT) + stopped_at - 1  # every token but the last one in the cache


def test_stop_string_inside_an_accepted_draft_row_append():
    """Row.append of one step that holds a stop string and reaches max_new_tokens: cut where plain decoding stops."""
    decode = lambda ids: "".join(chr(i) for i in ids)
    row = Row([1], SamplingParams(max_new_tokens=5, stop=["cd"]))
    kept = row.append([ord(c) for c in "abcdef"], set(), 100, decode)
    assert decode(kept) == "abcd" and row.finish_reason == "stop" and row.stats.new_tokens == 4
    assert row.final_text(decode) == "ab"
