"""The logit n-gram table: for the last n tokens (n = 1..max_n), the target's top-k next tokens.

A value is top-k token ids with probabilities and a count c. Inserting distribution d under a
key seen c times gives `(c*old + d)/(c+1)` over the union of tokens (a missing token counts 0),
cut back to the top k (DESIGN.md section 2).

Memory is bounded: fixed-size arrays of `capacity` slots, a dict from a 64-bit key hash to its
slot, and least-recently-used eviction in batches of capacity/8 when the table is full. Every slot
also stores its key tokens, so a hash collision or an evicted key never returns stale data.
Hashing, key checks and the merge are vectorised over all keys of a batch.

Files (`save`/`load`): magic, format version, a JSON header, the used slots' arrays (raw
little-endian, no pickle) and a SHA-256 of everything before it; written to a temporary file and
renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from .errors import StandError

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_PRIME = np.uint64(0x100000001B3)
MAGIC = b"STANDNGT"
FORMAT_VERSION = 1


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 [N]."""
    h = h ^ (h >> np.uint64(30))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(27))
    h = h * _MIX2
    return h ^ (h >> np.uint64(31))


def key_hashes(keys: np.ndarray) -> np.ndarray:
    """[N, max_n] int keys, left-padded with -1 -> [N] uint64 hashes (the order is part of the key)."""
    h = np.full(len(keys), 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(keys.shape[1]):
            h = h * _PRIME + (keys[:, j] + 2).astype(np.uint64)
        return _mix(h)


def suffix_keys(tails: np.ndarray, max_n: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, max_n] context tails (left-padded -1) -> keys [B*max_n, max_n] and the source row [B*max_n].

    Key (b, n) is the last n tokens of tail b, left-padded with -1; keys needing more tokens than the
    tail holds are dropped. Rows come out grouped by b, orders 1..max_n within a row.
    """
    B = len(tails)
    cols = np.arange(max_n)
    n = np.arange(1, max_n + 1)
    keep_col = cols[None, :] >= (max_n - n)[:, None]  # [max_n (order), max_n (col)]
    keys = np.where(keep_col[None], tails[:, None, :], -1).reshape(B * max_n, max_n)
    enough = (tails[:, None, :] >= 0) | ~keep_col[None]  # every needed column is a real token
    valid = enough.all(-1).reshape(-1)
    rows = np.repeat(np.arange(B), max_n)
    return keys[valid], rows[valid]


def tails_of(tokens: np.ndarray, max_n: int) -> np.ndarray:
    """[L] tokens -> [L, max_n] the context tail ending at every position, left-padded with -1."""
    padded = np.concatenate([np.full(max_n - 1, -1, dtype=np.int64), np.asarray(tokens, dtype=np.int64)])
    return np.lib.stride_tricks.sliding_window_view(padded, max_n).copy()


def merge_topk(old_ids: np.ndarray, old_p: np.ndarray, counts: np.ndarray, new_ids: np.ndarray,
               new_p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(c*old + new)/(c+1) over the union of tokens, cut to the top k; ids -1 mark empty entries.

    old_ids, old_p: [R, k]; counts: [R]; new_ids, new_p: [R, k'] -> ids [R, k], probs [R, k].
    """
    c = counts.astype(np.float64)[:, None]
    old_w = np.where(old_ids >= 0, old_p * (c / (c + 1)), 0.0)  # [R, k]
    new_w = np.where(new_ids >= 0, new_p / (c + 1), 0.0)  # [R, k']
    match = (new_ids[:, :, None] == old_ids[:, None, :]) & (old_ids[:, None, :] >= 0)  # [R, k', k]
    old_w = old_w + (match * new_w[:, :, None]).sum(1)
    new_w = np.where(match.any(2), 0.0, new_w)
    ids = np.concatenate([old_ids, new_ids], axis=1)  # [R, k + k']
    w = np.concatenate([old_w, new_w], axis=1)
    w = np.where(ids >= 0, w, 0.0)
    order = np.argsort(-w, axis=1, kind="stable")[:, :k]
    top_w = np.take_along_axis(w, order, 1)
    top_ids = np.where(top_w > 0, np.take_along_axis(ids, order, 1), -1)
    return top_ids, top_w


@dataclass
class Lookup:
    """Where a batch of contexts matched: slot [B] (-1 = no match) and the order n that matched [B]."""

    slot: np.ndarray
    order: np.ndarray


class NGramTable:
    def __init__(self, max_n: int = 4, topk: int = 10, capacity: int = 1 << 18):
        if max_n < 1 or topk < 1 or capacity < 8:
            raise StandError(f"n-gram table needs max_n >= 1, topk >= 1, capacity >= 8 "
                             f"(got {max_n}, {topk}, {capacity})")
        self.max_n, self.topk, self.capacity = max_n, topk, capacity
        self.keys = np.full((capacity, max_n), -1, dtype=np.int32)  # [C, max_n] left-padded key tokens
        self.hashes = np.zeros(capacity, dtype=np.uint64)  # [C]
        self.ids = np.full((capacity, topk), -1, dtype=np.int32)  # [C, K]
        self.probs = np.zeros((capacity, topk), dtype=np.float32)  # [C, K]
        self.counts = np.zeros(capacity, dtype=np.int32)  # [C], 0 = free slot
        self.stamps = np.zeros(capacity, dtype=np.int64)  # [C] last touch, for LRU eviction
        self.index: dict[int, int] = {}  # key hash -> slot
        self.free = list(range(capacity - 1, -1, -1))  # a stack of free slots
        self.tick = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.index)

    def memory_bytes(self) -> int:
        arrays = sum(a.nbytes for a in (self.keys, self.hashes, self.ids, self.probs, self.counts, self.stamps))
        return arrays + sys.getsizeof(self.index) + 8 * self.capacity + 64 * len(self.index)

    # ---- insert ---------------------------------------------------------------------------------

    def insert(self, tails: np.ndarray, top_ids: np.ndarray, top_probs: np.ndarray) -> None:
        """Inserts distribution b under every suffix key (orders 1..max_n) of context tail b.

        tails: [B, max_n] the last max_n tokens of each context, left-padded with -1;
        top_ids, top_probs: [B, k'] the distribution's top tokens (k' <= topk is sensible).
        Keys repeated within the batch are merged in batch order, as sequential inserts would be.
        """
        keys, rows = suffix_keys(np.asarray(tails, dtype=np.int64), self.max_n)
        if len(keys) == 0:
            return
        self.tick += 1
        ids = np.asarray(top_ids, dtype=np.int64)[rows]
        probs = np.asarray(top_probs, dtype=np.float64)[rows]
        h = key_hashes(keys)
        for sel in _rounds(h):
            self._insert_distinct(keys[sel], h[sel], ids[sel], probs[sel])

    def _insert_distinct(self, keys, h, ids, probs) -> None:
        """One merge for keys with distinct hashes: [R, max_n], [R], [R, k'], [R, k']."""
        slots = self._find(keys, h)
        missing = np.flatnonzero(slots < 0)
        if len(missing):
            slots[missing] = self._allocate(keys[missing], h[missing])
        self.stamps[slots] = self.tick
        new_ids, new_p = merge_topk(self.ids[slots].astype(np.int64), self.probs[slots].astype(np.float64),
                                    self.counts[slots], ids, probs, self.topk)
        self.ids[slots] = new_ids
        self.probs[slots] = new_p
        self.counts[slots] += 1

    def _find(self, keys: np.ndarray, h: np.ndarray) -> np.ndarray:
        """[R] slot of each key, -1 if absent (a hash hit whose stored key differs is absent)."""
        get = self.index.get
        slots = np.fromiter((get(x, -1) for x in h.tolist()), dtype=np.int64, count=len(h))
        hit = slots >= 0
        if hit.any():
            same = (self.keys[slots[hit]] == keys[hit]).all(1)
            slots[np.flatnonzero(hit)[~same]] = -1
        return slots

    def _allocate(self, keys: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Fresh empty slots for new keys (evicting if needed); registers them in the index."""
        if len(self.free) < len(keys):
            self._evict(max(len(keys) - len(self.free), self.capacity // 8))
        slots = np.array([self.free.pop() for _ in range(len(keys))], dtype=np.int64)
        for x in h.tolist():  # a colliding older key loses its index entry
            old = self.index.get(x)
            if old is not None:
                self._clear(np.array([old]))
        self.keys[slots] = keys
        self.hashes[slots] = h
        self.index.update(zip(h.tolist(), slots.tolist()))
        return slots

    def _evict(self, n: int) -> None:
        """Frees the n least recently touched slots (never those touched in the current insert)."""
        used = np.flatnonzero(self.counts > 0)
        used = used[self.stamps[used] < self.tick]
        n = min(n, len(used))
        if n == 0:
            raise StandError("n-gram table capacity too small for one insert batch")
        victims = used[np.argpartition(self.stamps[used], n - 1)[:n]]
        self._clear(victims)
        self.evictions += n

    def _clear(self, slots: np.ndarray) -> None:
        for x, s in zip(self.hashes[slots].tolist(), slots.tolist()):
            if self.index.get(x) == s:
                del self.index[x]
        self.keys[slots] = -1
        self.ids[slots] = -1
        self.probs[slots] = 0.0
        self.counts[slots] = 0
        self.stamps[slots] = 0
        self.free.extend(slots.tolist())

    # ---- lookup ---------------------------------------------------------------------------------

    def lookup(self, tails: np.ndarray) -> Lookup:
        """Longest-match backoff for every context tail [B, max_n]: the longest stored suffix key."""
        tails = np.asarray(tails, dtype=np.int64)
        B = len(tails)
        slot = np.full(B, -1, dtype=np.int64)
        order = np.zeros(B, dtype=np.int64)
        keys, rows = suffix_keys(tails, self.max_n)
        if len(keys) == 0 or not self.index:
            return Lookup(slot, order)
        found = self._find(keys, key_hashes(keys))
        n_of = (keys >= 0).sum(1)
        for n in range(1, self.max_n + 1):  # longer orders overwrite shorter ones
            sel = (found >= 0) & (n_of == n)
            slot[rows[sel]] = found[sel]
            order[rows[sel]] = n
        hit = slot >= 0
        self.stamps[slot[hit]] = self.tick
        return Lookup(slot, order)

    def dist(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored top-k of a slot: ids [K'] and probabilities [K'] (not renormalised), empties dropped."""
        ids, p = self.ids[slot], self.probs[slot]
        keep = (ids >= 0) & (p > 0)
        return ids[keep].astype(np.int64), p[keep].astype(np.float64)

    def get(self, key) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Exact lookup of one key (a sequence of 1..max_n tokens): (ids, probs, count) or None."""
        key = list(key)
        if not 1 <= len(key) <= self.max_n:
            raise StandError(f"a key has 1..{self.max_n} tokens, got {len(key)}")
        k = np.array([[-1] * (self.max_n - len(key)) + key], dtype=np.int64)
        s = int(self._find(k, key_hashes(k))[0])
        if s < 0:
            return None
        ids, p = self.dist(s)
        return ids, p, int(self.counts[s])

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, path: str, meta: dict | None = None) -> None:
        """Writes the used slots atomically (temporary file, then rename)."""
        used = np.flatnonzero(self.counts > 0)
        order = used[np.argsort(self.stamps[used], kind="stable")]  # oldest first: LRU order survives
        header = {"max_n": self.max_n, "topk": self.topk, "capacity": self.capacity, "n": int(len(order)),
                  "meta": meta or {}}
        body = io.BytesIO()
        hb = json.dumps(header).encode()
        body.write(MAGIC + struct.pack("<II", FORMAT_VERSION, len(hb)) + hb)
        for a in (self.keys[order], self.ids[order], self.probs[order], self.counts[order]):
            body.write(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes())
        data = body.getvalue()
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".ngt-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data + hashlib.sha256(data).digest())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str, capacity: int | None = None) -> tuple["NGramTable", dict]:
        """Reads a saved table; StandError if the file is missing, corrupt, truncated or not a table."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise StandError(f"cannot read n-gram table {path}: {e}") from e
        if not raw.startswith(MAGIC):
            raise StandError(f"{path} is not a stand n-gram table (bad magic)")
        if len(raw) < len(MAGIC) + 8 + 32:
            raise StandError(f"n-gram table {path} is truncated")
        data, digest = raw[:-32], raw[-32:]
        if hashlib.sha256(data).digest() != digest:
            raise StandError(f"n-gram table {path} is corrupt or truncated (checksum mismatch)")
        version, hlen = struct.unpack_from("<II", data, len(MAGIC))
        if version != FORMAT_VERSION:
            raise StandError(f"n-gram table {path} has format version {version}, this stand reads {FORMAT_VERSION}")
        start = len(MAGIC) + 8
        try:
            header = json.loads(data[start:start + hlen])
            max_n, topk, n = int(header["max_n"]), int(header["topk"]), int(header["n"])
        except (ValueError, KeyError, TypeError) as e:
            raise StandError(f"n-gram table {path} has a bad header: {e}") from e
        table = cls(max_n, topk, max(capacity or header.get("capacity", n), n, 8))
        table._fill(memoryview(data)[start + hlen:], n, path)
        return table, header.get("meta", {})

    def _fill(self, buf, n: int, path: str) -> None:
        specs = [("<i4", (n, self.max_n)), ("<i4", (n, self.topk)), ("<f4", (n, self.topk)), ("<i4", (n,))]
        need = sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s in specs)
        if len(buf) != need:
            raise StandError(f"n-gram table {path} has {len(buf)} data bytes, expected {need}")
        out, off = [], 0
        for d, s in specs:
            size = np.dtype(d).itemsize * int(np.prod(s))
            out.append(np.frombuffer(buf[off:off + size], dtype=d).reshape(s))
            off += size
        keys, ids, probs, counts = out
        slots = np.arange(n)
        h = key_hashes(keys.astype(np.int64))
        self.keys[slots], self.ids[slots], self.probs[slots], self.counts[slots] = keys, ids, probs, counts
        self.hashes[slots] = h
        self.stamps[slots] = np.arange(1, n + 1)
        self.tick = n + 1
        self.index = dict(zip(h.tolist(), slots.tolist()))
        self.free = list(range(self.capacity - 1, n - 1, -1))


def _rounds(h: np.ndarray):
    """Index sets over h in which every hash occurs once: the j-th occurrences of each hash, j = 0, 1, ..."""
    _, inverse = np.unique(h, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    grp = inverse[order]
    starts = np.flatnonzero(np.r_[True, grp[1:] != grp[:-1]])
    rank = np.empty(len(h), dtype=np.int64)
    rank[order] = np.arange(len(h)) - np.repeat(starts, np.diff(np.r_[starts, len(h)]))
    for r in range(int(rank.max()) + 1):
        yield np.flatnonzero(rank == r)
