"""Streamed text is the answer: the deltas a TextStream hands out, concatenated, equal the finished row's text,
whatever the step boundaries, for byte-level BPE (the real default tokenizer) and for a decoder that cleans up
spaces ("I 'm" -> "I'm": it rewrites text already decoded once the next token arrives)."""

from __future__ import annotations

import numpy as np
import pytest

from stand.server import TextStream
from tiny import byte_tokenizer

TEXTS = ["I 'm here , ok . Don 't you 've seen it ?", "a ' b n't c 're d 's e !", "plain words and more words",
         "é€😀 mixed ' bytes , here .", "x  .  y  ,z ' ' ' n't n't"]


def cleaned(decode):
    """A decoder that cleans up spaces as Hugging Face's clean_up_tokenization does (WordPiece tokenizers)."""
    def clean(ids: list[int]) -> str:
        text = decode(ids)
        for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(a, b)
        return text

    return clean


def streamed(decode, ids: list[int], cuts: list[int], stop: list[str]) -> tuple[str, str]:
    """(the deltas joined, the finished text) for ids committed at the given step ends."""
    stream, deltas = TextStream(decode, stop), []
    for end in cuts:
        deltas.append(stream.update(ids[:end], done=end == len(ids)))
    return "".join(deltas), stream.final(ids)


def step_ends(n: int, rng) -> list[int]:
    """Random step ends (1 to 5 tokens a step, as accepted drafts give), the last at n."""
    ends, at = [], 0
    while at < n:
        at = min(at + int(rng.integers(1, 6)), n)
        ends.append(at)
    return ends


@pytest.fixture(scope="module")
def default_tokenizer():
    from stand.backends.load import default_model_path
    from stand.backends.torch import load_tokenizer

    return load_tokenizer(default_model_path())


@pytest.mark.parametrize("stop", [[], ["ok"], ["n't"]])
def test_stream_equals_answer_with_a_cleaning_tokenizer(stop):
    decode = cleaned(byte_tokenizer().decode)
    tok, rng = byte_tokenizer(), np.random.default_rng(0)
    for text in TEXTS:
        ids = tok.encode(text)
        for cuts in [list(range(1, len(ids) + 1))] + [step_ends(len(ids), rng) for _ in range(20)]:
            joined, final = streamed(decode, ids, cuts, stop)
            assert joined == final, (text, cuts)


def test_stream_equals_answer_with_the_default_tokenizer(default_tokenizer):
    decode = lambda ids: default_tokenizer.decode(ids, skip_special_tokens=True)
    rng = np.random.default_rng(1)
    texts = TEXTS + ["<|im_end|> after a special token", "  leading spaces\n\nand lines\ttabs"]
    for text in texts:
        ids = default_tokenizer.encode(text)
        for cuts in [list(range(1, len(ids) + 1))] + [step_ends(len(ids), rng) for _ in range(10)]:
            joined, final = streamed(decode, ids, cuts, [])
            assert joined == final, (text, cuts)
    for _ in range(30):  # random tokens: partial characters, odd merges
        ids = rng.integers(0, default_tokenizer.vocab_size, 40).tolist()
        joined, final = streamed(decode, ids, step_ends(len(ids), rng), [])
        assert joined == final
