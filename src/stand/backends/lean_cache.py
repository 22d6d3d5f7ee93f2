"""The lean forward's KV cache: every layer's keys and values in one preallocated tensor, grown in chunks and
compacted after a step with one gather/scatter for all layers (the bookkeeping rules are kv.py's)."""

from __future__ import annotations

import math

import torch

from stand.backends.kv import cat_rows, path_moves
from stand.errors import StandError

CACHE_CHUNK = 256  # cache capacity grows in steps of this many slots


class LeanCache:
    """KV of every layer in one preallocated tensor [layers, 2, B, H_kv, capacity, D].

    Slots [0, length) are in use (row b's committed KV in [0, L_b), a masked gap after it, as in
    kv.py); capacity grows in chunks of CACHE_CHUNK slots, copying once per chunk.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.shape = (layers, 2, kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.kv: torch.Tensor | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.shape[4]

    def _alloc(self, rows: int, capacity: int) -> torch.Tensor:
        layers, two, heads, dim = self.shape
        return torch.empty(layers, two, rows, heads, capacity, dim, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def reserve(self, rows: int, new: int) -> int:
        """Room for `new` more slots in every one of `rows` rows; returns the first free slot."""
        if self.kv is not None and self.kv.shape[2] != rows:
            raise StandError(f"the cache holds {self.kv.shape[2]} rows, the batch has {rows}")
        need = self.length + new
        if need > self.capacity:
            grown = self._alloc(rows, CACHE_CHUNK * math.ceil(need / CACHE_CHUNK))
            if self.kv is not None and self.length:
                grown[..., : self.length, :] = self.kv[..., : self.length, :]
            self.kv = grown
        return self.length

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer i, [B, H_kv, capacity, D] each (views)."""
        return self.kv[i, 0], self.kv[i, 1]

    @torch.inference_mode()
    def commit(self, paths: list[list[int]], lengths: list[int], cache_len: int) -> list[int]:
        """After a tree step written at slots [cache_len, cache_len + T): keep the accepted paths."""
        rows, src, dst, new_lengths = (t.to(self.device) if torch.is_tensor(t) else t
                                       for t in path_moves(paths, lengths, cache_len))
        self.kv[:, :, rows, :, dst] = self.kv[:, :, rows, :, src]  # every layer at once; src >= dst
        self.length = max(new_lengths)
        return new_lengths

    @torch.inference_mode()
    def extend(self, other: "LeanCache", rows: tuple[int, int]) -> None:
        """other's rows after ours (rows: how many each holds); slots padded to the longer."""
        if self.kv is None and other.kv is None:
            return
        mine = None if self.kv is None else self.kv[..., : self.length, :]
        theirs = None if other.kv is None else other.kv[..., : other.length, :]
        both = cat_rows(mine, theirs, rows, 2, 4)  # [layers, 2, B1 + B2, H, S, D]
        self.length = both.shape[4]
        self.kv = self._alloc(both.shape[2], CACHE_CHUNK * math.ceil(max(self.length, 1) / CACHE_CHUNK))
        self.kv[..., : self.length, :] = both

    @torch.inference_mode()
    def take(self, row: int, length: int) -> "LeanCache":
        """A cache of its own holding a copy of row `row`'s first `length` slots."""
        out = LeanCache(self.shape[0], self.shape[2], self.shape[3], self.dtype, self.device)
        out.kv = out._alloc(1, CACHE_CHUNK * math.ceil(max(length, 1) / CACHE_CHUNK))
        out.kv[..., :length, :] = self.kv[:, :, row:row + 1, :, :length]
        out.length = length
        return out

    @torch.inference_mode()
    def keep_rows(self, keep: list[int], new_len: int) -> None:
        """Rows `keep` (repeats allowed) of the first new_len slots; the rest is dropped."""
        if self.kv is None:
            self.length = new_len
            return
        fresh = self._alloc(len(keep), max(self.capacity, new_len))
        fresh[..., :new_len, :] = self.kv[:, :, torch.tensor(keep, dtype=torch.long, device=self.device), :, :new_len]
        self.kv, self.length = fresh, new_len
