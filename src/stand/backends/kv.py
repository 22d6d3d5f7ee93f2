"""Tree attention inputs and KV-cache bookkeeping for a batch of rows with ragged lengths.

Row b has its committed KV in cache slots [0, L_b); the cache is S = max_b L_b slots long, and
slots [L_b, S) of a shorter row are a masked gap. A step writes every row's tree at slots
[S, S + T); afterwards the accepted path of row b is moved to [L_b, L_b + k_b) and the cache is
cut to the new max_b L_b.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stand.core.tree import DraftTree


@dataclass
class TreeBatch:
    input_ids: torch.Tensor  # [B, T] root token then draft tokens, padded
    position_ids: torch.Tensor  # [B, T] L_b + depth
    allowed: torch.Tensor  # [B, T, S + T] bool: query may attend key
    sizes: list[int]  # [B] real nodes per row (root included)


def tree_batch(trees: list[DraftTree], roots: list[int], lengths: list[int], cache_len: int,
               width: int | None = None) -> TreeBatch:
    """Inputs for one verification pass. roots[b] is row b's last committed token. width: tokens per row (at least
    the largest tree + 1); positions past a row's tree are padding that sees only itself."""
    sizes = [len(t) + 1 for t in trees]
    B, T, S = len(trees), max(max(sizes), width or 0), cache_len
    ids = np.zeros((B, T), dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    allowed = np.zeros((B, T, S + T), dtype=bool)
    for b, (tree, root, L) in enumerate(zip(trees, roots, lengths)):
        n = sizes[b]
        ids[b, 0], ids[b, 1:n] = root, tree.tokens
        pos[b, :n] = L + np.concatenate([[0], tree.depths()])
        pos[b, n:] = L  # padding: any valid position
        allowed[b, :, :L] = True
        allowed[b, :n, S:S + n] = tree.ancestor_matrix()
        allowed[b, np.arange(n, T), S + np.arange(n, T)] = True  # padding sees itself only
    return TreeBatch(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(allowed), sizes)


def prefill_batch(prompts: list[list[int]]) -> TreeBatch:
    """Causal inputs for prompts of ragged lengths, right-padded, into an empty cache."""
    sizes = [len(p) for p in prompts]
    B, T = len(prompts), max(sizes)
    ids = np.zeros((B, T), dtype=np.int64)
    causal = np.tril(np.ones((T, T), dtype=bool))
    allowed = np.repeat(causal[None], B, axis=0)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
        allowed[b, len(p):, :] = np.eye(T, dtype=bool)[len(p):]  # padding sees itself only
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    return TreeBatch(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(allowed), sizes)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, K] bool -> [B, 1, T, K] float mask: 0 where allowed, the dtype's min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def path_moves(paths: list[list[int]], lengths: list[int], cache_len: int):
    """Where accepted KV goes: paths[b] lists row b's accepted nodes, root (0) first.

    Returns (rows, src, dst) flat index tensors and the new lengths.
    """
    rows, src, dst, new_lengths = [], [], [], []
    for b, (path, L) in enumerate(zip(paths, lengths)):
        rows += [b] * len(path)
        src += [cache_len + i for i in path]
        dst += list(range(L, L + len(path)))
        new_lengths.append(L + len(path))
    as_t = lambda x: torch.tensor(x, dtype=torch.long)
    return as_t(rows), as_t(src), as_t(dst), new_lengths


def cat_rows(x: torch.Tensor | None, y: torch.Tensor | None, rows: tuple[int, int], row_dim: int,
             slot_dim: int) -> torch.Tensor:
    """Rows of x then rows of y, slots padded to the longer; a missing side (None: no slot yet) is empty rows."""
    ref = x if x is not None else y

    def fill(t, n):
        if t is None:
            shape = list(ref.shape)
            shape[row_dim], shape[slot_dim] = n, 0
            return ref.new_zeros(shape)
        return t

    x, y = fill(x, rows[0]), fill(y, rows[1])
    S = max(x.shape[slot_dim], y.shape[slot_dim])
    pad = lambda t: torch.cat([t, t.new_zeros([*t.shape[:slot_dim], S - t.shape[slot_dim], *t.shape[slot_dim + 1:]])],
                              dim=slot_dim)
    return torch.cat([pad(x), pad(y)], dim=row_dim)


class HFCache:
    """A transformers DynamicCache driven by the rules above."""

    def __init__(self):
        from transformers import DynamicCache

        self.cache = DynamicCache()

    def __len__(self) -> int:
        return self.cache.get_seq_length() if self.cache.layers and self.cache.layers[0].keys is not None else 0

    def _tensors(self):
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                yield layer

    def commit(self, paths: list[list[int]], lengths: list[int], cache_len: int) -> list[int]:
        """After a tree step written at slots [cache_len, cache_len + T): keep the accepted paths."""
        rows, src, dst, new_lengths = path_moves(paths, lengths, cache_len)
        new_len = max(new_lengths)
        for layer in self._tensors():
            for name in ("keys", "values"):
                t = getattr(layer, name)  # [B, H, S + T, D]
                t[rows, :, dst] = t[rows, :, src]
                setattr(layer, name, t[:, :, :new_len])
        return new_lengths

    def keep_rows(self, keep: list[int], new_len: int) -> None:
        idx = torch.tensor(keep, dtype=torch.long)
        for layer in self._tensors():
            layer.keys = layer.keys[idx, :, :new_len]
            layer.values = layer.values[idx, :, :new_len]

    def take(self, row: int, length: int) -> "HFCache":
        """A cache of its own holding a copy of row `row`'s first `length` slots."""
        out = HFCache()
        for i, layer in enumerate(self._tensors()):
            out.cache.update(layer.keys[row:row + 1, :, :length].clone(), layer.values[row:row + 1, :, :length].clone(), i)
        return out

    def extend(self, other: "HFCache", rows: tuple[int, int]) -> None:
        """other's rows after ours (rows: how many each holds); slots padded to the longer."""
        mine, theirs = list(self._tensors()), list(other._tensors())
        if not theirs:
            theirs = [None] * len(mine)
        if not mine:
            self.cache, mine, theirs = other.cache, [None] * len(theirs), theirs
            for layer, t in zip(self.cache.layers, theirs):
                layer.keys = cat_rows(None, t.keys, rows, 0, 2)
                layer.values = cat_rows(None, t.values, rows, 0, 2)
            return
        for layer, t in zip(mine, theirs):
            layer.keys = cat_rows(layer.keys, None if t is None else t.keys, rows, 0, 2)
            layer.values = cat_rows(layer.values, None if t is None else t.values, rows, 0, 2)
