"""A row's text as it streams: only text that later tokens can no longer change is handed out, so the deltas of a
stream, concatenated, are the finished row's text.

A decoder may change the end of the text it gave once more tokens come: an incomplete UTF-8 character decodes as
U+FFFD until its last byte arrives; a stop string may be starting; and a decoder that cleans up spaces (Hugging Face's
clean_up_tokenization, on by default for WordPiece tokenizers) drops a space before punctuation and contractions
(" ." -> ".", " n't" -> "n't", " ' " -> "'") once the characters after it arrive. Such a rule rewrites a space at most
REWRITE characters before the end of the text, so a space among the last REWRITE characters is held back with what
follows it.
"""

from __future__ import annotations

import logging
from typing import Callable

from stand.core.sequence import stop_index

log = logging.getLogger("stand.server")
REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence
REWRITE = 3  # characters after a space that a clean-up rule reads (" n't": the space and 3 more)


def settled(text: str) -> int:
    """How much of `text` no clean-up rule can rewrite: all of it, or up to a space among its last REWRITE
    characters."""
    tail = text[-REWRITE:]
    spaces = [i for i, ch in enumerate(tail) if ch.isspace()]
    return len(text) - len(tail) + spaces[0] if spaces else len(text)


class TextStream:
    """Decodes a row's tokens as they come and hands out only text that can no longer change."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode, self.stop = decode, stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may be starting here
        self.sent = ""
        self.rewritten = False

    def _cut(self, ids: list[int]) -> tuple[str, bool]:
        """The decoded text cut before the first stop string, and whether there was one."""
        text = self.decode(ids)
        cut = stop_index(text, self.stop)
        return (text, False) if cut is None else (text[:cut], True)

    def final(self, ids: list[int]) -> str:
        """The finished row's text, cut at the first stop string (the engine's Row.final_text)."""
        return self._cut(ids)[0]

    def stable(self, ids: list[int]) -> str:
        """The text of an unfinished row that later tokens cannot change."""
        text, stopped = self._cut(ids)
        if stopped:
            return text
        text = text.rstrip(REPLACEMENT)  # an incomplete multi-byte character
        return text[: min(len(text) - self.hold, settled(text))]

    def update(self, ids: list[int], done: bool) -> str:
        """The new text since the last call ("" while nothing new is stable)."""
        text = self.final(ids) if done else self.stable(ids)
        if not text.startswith(self.sent):
            # a decoder that rewrote text further back than REWRITE characters: what was sent stays sent, and the
            # stream goes on from the same length (logged once: the stream may differ from the text here)
            if not self.rewritten:
                log.warning("the tokenizer rewrote streamed text %r as %r", self.sent[-20:], text[:len(self.sent)][-20:])
                self.rewritten = True
            text = self.sent + text[len(self.sent):]
        delta, self.sent = text[len(self.sent):], text
        return delta
