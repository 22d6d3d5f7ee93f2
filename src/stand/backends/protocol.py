"""What the engine needs from a model: the backend protocol.

A backend computes the target's logits; it knows nothing of drafters or verification. The engine
drives a Cache, which holds the committed tokens of every live row, in three moves per step:
`step` (one verification pass: each row's draft tree after its committed tokens -> logits at every
node), `commit` (keep only each row's accepted path) and `keep` (rows that finished leave).
Implementations: backends/torch.py (Hugging Face + lean forward), backends/llamacpp.py (llama.cpp).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from stand.core.tree import DraftTree


PREFILL_CHUNK = 256  # prompt positions whose logits are handed over at once
OnLogits = Callable[[list[int], int, torch.Tensor], None]


class Cache(Protocol):
    def prefill(self, prefixes: list[list[int]], on_logits: OnLogits | None = None,
                reuse: list[tuple[object, int] | None] | None = None) -> None:
        """Adds one row per prefix (a prompt less its last token) after the rows already here; equal prefixes are
        computed once. on_logits(rows, start, logits [C, V]): the logits after prefix tokens start..start+C-1 of
        the new rows `rows` (indices into prefixes: those sharing that prefix), chunk by chunk (C <= PREFILL_CHUNK): never all at once.
        reuse[b] = (handle, k) (only without on_logits): prefix b's first k tokens are those a parked row's cells
        hold (park), so they are copied, not computed."""

    def park(self, row: int) -> tuple[object, int]:
        """Row `row`'s cached tokens outlive it (keep() drops the row, not them) until unpark: (handle, how many
        positions they are). A row ended mid-tree may hold cells beyond its tokens: reuse only the shared prefix."""

    def unpark(self, handle: object) -> None:
        """Frees what park kept."""

    def step(self, trees: list[DraftTree], roots: list[int], width: int | None = None) -> Sequence[torch.Tensor]:
        """One verification pass. roots[b]: row b's last committed token, not yet in the cache; its tree hangs
        below it. Returns row b's logits [len(trees[b]) + 1, V] at the root and every node (root-0 indexing).
        The tensors may be views of the backend's buffers: valid until the next call.
        width: tokens per row the pass runs at (None: the widest tree's, root included); a backend that pads
        (Backend.pads) fills each row up to it with padding positions that see only themselves and whose logits
        and KV are dropped, so no output changes; a backend that does not pad is never given one."""

    def commit(self, paths: list[list[int]]) -> None:
        """After step: row b keeps nodes paths[b] (root-0 indices, root first, each the child of the one before)."""

    def keep(self, rows: list[int]) -> None:
        """Only rows `rows` (indices in the current order, ascending) stay; the others are dropped."""


class Backend(Protocol):
    kind: str  # "torch", "llama.cpp"
    name: str  # the model's name
    dtype: object  # what the weights compute in (a torch dtype, or a GGUF type name)
    pads: bool  # Cache.step honours `width`: a pass can be widened to a faster shape (core/cost.py CostGrid)

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_len(self) -> int: ...

    @property
    def eos_ids(self) -> set[int]: ...

    @property
    def max_sequences(self) -> int | None:
        """Most sequences (rows plus tree leaves beyond one per row) one pass may hold (None: no bound)."""

    @property
    def max_pass_tokens(self) -> int | None:
        """Most tokens (roots and draft nodes of all rows) one pass may hold (None: no bound)."""

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of a prompt, through the chat template (one user message) when chat and the model has one."""

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids of chat messages [{"role", "content"}] through the chat template, the assistant's turn opened."""

    def decode(self, ids: list[int]) -> str: ...

    def new_cache(self) -> Cache: ...

    def next_logits(self, contexts: list[list[int]]) -> torch.Tensor:
        """[N, V] float32 logits of the next token after each context (contexts of equal length)."""

    def fingerprint(self) -> str:
        """A short string that changes when the weights change (for caches of model-derived tables)."""


def pads(target) -> bool:
    """Whether the backend can widen a pass with padding (False for one that does not say)."""
    return bool(getattr(target, "pads", False))
