"""The logit n-gram table: for the last n tokens (n = 1..max_n), the target's top-k next tokens.

A value is top-k token ids with probabilities and a count c. Inserting distribution d under a key seen c times gives
`(c*old + d)/(c+1)` over the union of tokens (missing tokens count 0), cut back to the top k (STAND, arXiv 2506.04708).

Memory is bounded: fixed-size arrays of `capacity` slots, a dict from the key (a tuple of max_n ids, left-padded
with -1) to its slot, and least-recently-used eviction in batches of capacity/8 when the table is full (a batch of
more keys than slots keeps its last ones); an evicted key leaves the dict, so it can never return stale data. Key
building and the merge are vectorised over all keys of a batch; the dict does the matching.

Files (`save`/`load`): magic, format version, a JSON header, the used slots' arrays (raw little-endian, no pickle)
and a SHA-256 of everything before it; written to a temporary file and renamed into place (concurrent writers: the
last rename wins, no file is ever torn). Loading checks every size in the header against the file's length before
allocating, and the ids and probabilities.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys

import numpy as np

from stand.core.files import atomic_path
from stand.errors import StandError

MAGIC = b"STANDNGT"
FORMAT_VERSION = 1
MAX_ORDER, MAX_TOPK = 64, 4096  # the largest max_n and topk a file may declare
MAX_TABLE_BYTES = 4 << 30  # the largest table a file may make (its slots' arrays: 4 max_n + 8 topk + 20 bytes each)


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


def last_tail(tokens, max_n: int) -> np.ndarray:
    """[max_n] the last max_n tokens, left-padded with -1 (the last row of tails_of, without building the others)."""
    last = list(tokens[-max_n:])
    return np.array([-1] * (max_n - len(last)) + last, dtype=np.int64)


def merge_topk(old_ids: np.ndarray, old_p: np.ndarray, counts: np.ndarray, new_ids: np.ndarray,
               new_p: np.ndarray, k: int, recency: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(1-a)*old + a*new over the union of tokens with a = max(1/(c+1), recency), cut to the top k; ids -1 mark
    empty entries. recency 0: the running mean (c*old + new)/(c+1); 1: the latest distribution only.

    old_ids, old_p: [R, k]; counts: [R]; new_ids, new_p: [R, k'] -> ids [R, k], probs [R, k].
    """
    a = np.maximum(1.0 / (counts.astype(np.float64)[:, None] + 1.0), recency)  # [R, 1] weight of the new one
    old_w = np.where(old_ids >= 0, old_p * (1.0 - a), 0.0)  # [R, k]
    new_w = np.where(new_ids >= 0, new_p * a, 0.0)  # [R, k']
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


class NGramTable:
    def __init__(self, max_n: int = 4, topk: int = 10, capacity: int = 1 << 18, recency: float = 0.0):
        if max_n < 1 or topk < 1 or capacity < 8 or not 0.0 <= recency <= 1.0:
            raise StandError(f"n-gram table needs max_n >= 1, topk >= 1, capacity >= 8, recency in [0, 1] "
                             f"(got {max_n}, {topk}, {capacity}, {recency})")
        self.max_n, self.topk, self.capacity, self.recency = max_n, topk, capacity, recency
        self.keys = np.full((capacity, max_n), -1, dtype=np.int32)  # [C, max_n] left-padded key tokens
        self.ids = np.full((capacity, topk), -1, dtype=np.int32)  # [C, K]
        self.probs = np.zeros((capacity, topk), dtype=np.float32)  # [C, K]
        self.counts = np.zeros(capacity, dtype=np.int32)  # [C], 0 = free slot
        self.stamps = np.zeros(capacity, dtype=np.int64)  # [C] last touch, for LRU eviction
        self.index: dict[tuple, int] = {}  # key tokens (left-padded with -1) -> slot
        self.free = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # a stack of free slots: free[:n_free]
        self.n_free = capacity
        self.tick = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.index)

    def memory_bytes(self) -> int:
        arrays = sum(a.nbytes for a in (self.keys, self.ids, self.probs, self.counts, self.stamps))
        return arrays + self.free.nbytes + sys.getsizeof(self.index) + (56 + 8 * self.max_n) * len(self.index)

    # ---- insert ---------------------------------------------------------------------------------

    def insert(self, tails: np.ndarray, top_ids: np.ndarray, top_probs: np.ndarray) -> None:
        """Inserts distribution b under every suffix key (orders 1..max_n) of context tail b.

        tails: [B, max_n] the last max_n tokens of each context, left-padded with -1;
        top_ids, top_probs: [B, k'] the distribution's top tokens (k' <= topk is sensible).
        Keys repeated within the batch are merged in batch order, as sequential inserts would be.
        """
        keys, rows = suffix_keys(np.asarray(tails, dtype=np.int64), self.max_n)
        keys, rows = keys[-self.capacity:], rows[-self.capacity:]  # more than fit: the latest, as eviction keeps
        if len(keys) == 0:
            return
        self.tick += 1
        ids = np.asarray(top_ids, dtype=np.int64)[rows]
        probs = np.asarray(top_probs, dtype=np.float64)[rows]
        tuples = list(map(tuple, keys.tolist()))
        for sel in _rounds(tuples):
            self._insert_distinct(keys[sel], [tuples[i] for i in sel], ids[sel], probs[sel])

    def _insert_distinct(self, keys, tuples, ids, probs) -> None:
        """One merge for distinct keys: [R, max_n] (and as tuples), [R, k'], [R, k']."""
        slots = self._find(tuples)
        missing = np.flatnonzero(slots < 0)
        if len(missing):
            slots[missing] = self._allocate(keys[missing], [tuples[i] for i in missing])
        self.stamps[slots] = self.tick
        new_ids, new_p = merge_topk(self.ids[slots].astype(np.int64), self.probs[slots].astype(np.float64),
                                    self.counts[slots], ids, probs, self.topk, self.recency)
        self.ids[slots] = new_ids
        self.probs[slots] = new_p
        self.counts[slots] += 1

    def _find(self, tuples: list[tuple]) -> np.ndarray:
        """[R] slot of each key, -1 if absent."""
        get = self.index.get
        return np.fromiter((get(x, -1) for x in tuples), dtype=np.int64, count=len(tuples))

    def _allocate(self, keys: np.ndarray, tuples: list[tuple]) -> np.ndarray:
        """Fresh empty slots for new keys (evicting if needed); registers them in the index."""
        if self.n_free < len(keys):
            self._evict(max(len(keys) - self.n_free, self.capacity // 8))
        self.n_free -= len(keys)
        slots = self.free[self.n_free:self.n_free + len(keys)][::-1].copy()
        self.keys[slots] = keys
        self.index.update(zip(tuples, slots.tolist()))
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
        for key, s in zip(map(tuple, self.keys[slots].tolist()), slots.tolist()):
            if self.index.get(key) == s:
                del self.index[key]
        self.keys[slots] = -1
        self.ids[slots] = -1
        self.probs[slots] = 0.0
        self.counts[slots] = 0
        self.stamps[slots] = 0
        self.free[self.n_free:self.n_free + len(slots)] = slots
        self.n_free += len(slots)

    # ---- lookup ---------------------------------------------------------------------------------

    def longest(self, tail, min_n: int = 1) -> tuple[int, int]:
        """(slot, order) of the longest stored suffix of one context tail (max_n ids, left-padded -1) of at least
        min_n tokens; (-1, 0) if none."""
        tail = tuple(tail)
        m = self.max_n
        get = self.index.get
        for n in range(m, min_n - 1, -1):
            if tail[m - n] < 0:
                continue
            slot = get((-1,) * (m - n) + tail[m - n:])
            if slot is not None:
                self.stamps[slot] = self.tick
                return slot, n
        return -1, 0

    def dist(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored top-k of a slot: ids [K'] and probabilities [K'] (not renormalised), empties dropped."""
        ids, p = self.ids[slot], self.probs[slot]
        keep = (ids >= 0) & (p > 0)
        return ids[keep].astype(np.int64), p[keep].astype(np.float64)

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, path: str, meta: dict | None = None) -> None:
        """Writes the used slots atomically (a temporary file of its own, then one rename), readable by this user only.

        Concurrent writers of one file (processes, or threads of one) are last-writer-wins: each rename puts
        one whole table in place, so a reader or a later run never sees a torn file; no lock is taken.
        StandError if the file cannot be written.
        """
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
        try:
            with atomic_path(path, private=True) as tmp, open(tmp, "wb") as f:  # every user's n-grams
                f.write(data + hashlib.sha256(data).digest())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise StandError(f"cannot write n-gram table {path}: {e}") from e

    @classmethod
    def load(cls, path: str, capacity: int | None = None, vocab_size: int | None = None,
             options: tuple[int, int] | None = None) -> tuple["NGramTable", dict]:
        """Reads a saved table; StandError if the file is missing, corrupt, truncated or not a table, and
        TableMismatch if it was built for a vocabulary other than vocab_size or (options) another (max_n, topk).
        Nothing is allocated before the header's sizes are checked against the file's length, the options and
        MAX_TABLE_BYTES; ids must lie in the vocabulary (vocab_size, else the file's) and probabilities in [0, 1]."""
        data = _checked_bytes(path)
        header, body = _header(data, path)
        max_n, topk, n = header["max_n"], header["topk"], header["n"]
        if options is not None and (max_n, topk) != tuple(options):
            raise TableMismatch(f"n-gram table {path} has max_n={max_n}, topk={topk}; this run uses "
                                f"max_n={options[0]}, topk={options[1]}: give another table path or matching options")
        meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
        saved_vocab = meta.get("vocab_size")
        if vocab_size is not None and saved_vocab not in (None, vocab_size):
            raise TableMismatch(f"n-gram table {path} was built for a vocabulary of {saved_vocab} tokens, "
                                f"this model has {vocab_size}")
        vocab = vocab_size if vocab_size is not None else saved_vocab if isinstance(saved_vocab, int) else None
        arrays = _arrays(body, n, max_n, topk, path)
        _check_arrays(*arrays, vocab, path)
        capacity = header.get("capacity", n) if capacity is None else capacity
        if isinstance(capacity, bool) or not isinstance(capacity, int) or max(capacity, n, 8) * (
                4 * max_n + 8 * topk + 20) > MAX_TABLE_BYTES:
            raise StandError(f"n-gram table {path} asks for a capacity of {capacity!r} slots with max_n {max_n}, topk "
                             f"{topk}: stand reads tables of at most {MAX_TABLE_BYTES >> 30} GiB")
        table = cls(max_n, topk, max(capacity, n, 8))
        table._fill(*arrays, path)
        return table, meta

    def _fill(self, keys, ids, probs, counts, path: str) -> None:
        n = len(keys)
        slots = np.arange(n)
        self.keys[slots], self.ids[slots], self.probs[slots], self.counts[slots] = keys, ids, probs, counts
        self.stamps[slots] = np.arange(1, n + 1)
        self.tick = n + 1
        self.index = dict(zip(map(tuple, keys.tolist()), slots.tolist()))
        if len(self.index) != n:
            raise StandError(f"n-gram table {path} holds duplicate keys")
        self.free = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)
        self.n_free = self.capacity - n


class TableMismatch(StandError):
    """A sound table built for another model (vocabulary) or other table options than this run's."""


def check_table_path(path: str) -> str:
    """A table path stand may read and later replace: absent, an empty file, or a stand n-gram table (its
    contents are checked when it is loaded). StandError for a directory, or a file of anything else (named),
    or a place where no file can be written; checked before anything is decoded."""
    if os.path.isdir(path):
        raise StandError(f"n-gram table path {path} is a directory; give a file path")
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise StandError(f"n-gram table path {path} is not a regular file")
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except OSError as e:
            raise StandError(f"cannot read n-gram table {path}: {e}") from e
        if head and not head.startswith(MAGIC):
            raise StandError(f"{path} is not a stand n-gram table ({describe(head)}); stand will not overwrite "
                             f"it: give another path or remove it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # atomic_path creates the missing directories
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise StandError(f"cannot write the n-gram table {path}: {parent} is not a writable directory")
    return path


def describe(head: bytes) -> str:
    """What a file that starts with these bytes looks like, in a few words."""
    for magic, what in ((b"GGUF", "a GGUF model file"), (b"PK\x03\x04", "a zip archive"),
                        (b"\x93NUMPY", "a numpy array file"), (b"\x89PNG", "a PNG image")):
        if head.startswith(magic):
            return f"it is {what}"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it is binary data starting with {head[:8].hex()}"
    kind = "JSON" if text.lstrip()[:1] in ("{", "[") else "text"
    return f"it is {kind} starting with {text[:24].splitlines()[0] if text.strip() else ''!r}"


def _checked_bytes(path: str) -> bytes:
    """The file's bytes before its checksum, once magic, length and SHA-256 are right."""
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
    return data


def _header(data: bytes, path: str) -> tuple[dict, memoryview]:
    """The JSON header with max_n, topk and n checked as small integers, and the bytes after it."""
    version, hlen = struct.unpack_from("<II", data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise StandError(f"n-gram table {path} has format version {version}, this stand reads {FORMAT_VERSION}")
    start = len(MAGIC) + 8
    if start + hlen > len(data):
        raise StandError(f"n-gram table {path} has a header of {hlen} bytes, longer than the file")
    try:
        header = json.loads(data[start:start + hlen])
        sizes = [header[k] for k in ("max_n", "topk", "n")]
    except (ValueError, KeyError, TypeError) as e:
        raise StandError(f"n-gram table {path} has a bad header: {e}") from e
    bounds = ((1, MAX_ORDER), (1, MAX_TOPK), (0, len(data)))
    for name, v, (lo, hi) in zip(("max_n", "topk", "n"), sizes, bounds):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise StandError(f"n-gram table {path} has a bad header: {name} = {v!r} is not an integer in [{lo}, {hi}]")
    return header, memoryview(data)[start + hlen:]


def _arrays(buf, n: int, max_n: int, topk: int, path: str) -> list[np.ndarray]:
    """keys [n, max_n], ids [n, topk], probs [n, topk], counts [n]: views of buf, whose length must be exact."""
    specs = [("<i4", (n, max_n)), ("<i4", (n, topk)), ("<f4", (n, topk)), ("<i4", (n,))]
    need = n * 4 * (max_n + 2 * topk + 1)
    if len(buf) != need:
        raise StandError(f"n-gram table {path} has {len(buf)} data bytes, expected {need}")
    out, off = [], 0
    for d, shape in specs:
        size = 4 * int(np.prod(shape))
        out.append(np.frombuffer(buf[off:off + size], dtype=d).reshape(shape))
        off += size
    return out


def _check_arrays(keys, ids, probs, counts, vocab: int | None, path: str) -> None:
    """StandError unless keys are left-padded ids, ids lie in [-1, vocab) without repeats in an entry,
    probabilities are finite in [0, 1] (an entry's summing to at most 1) and every count is >= 1."""
    top = vocab if vocab is not None else np.iinfo(np.int32).max
    real = keys >= 0
    problems = [
        ("key ids outside the vocabulary", ((keys < -1) | (keys >= top)).any()),
        ("keys not left-padded", len(keys) and not (real[:, -1].all() and (np.diff(real.astype(np.int8), axis=1) >= 0).all())),
        ("next-token ids outside the vocabulary", ((ids < -1) | (ids >= top)).any()),
        ("probabilities outside [0, 1]", not (np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all())),
        ("entries whose probabilities sum over 1", (probs.astype(np.float64).sum(1) > 1.0 + 1e-3).any()),
        ("counts below 1", (counts < 1).any()),
    ]
    ordered = np.sort(ids, axis=1)
    problems.append(("an entry naming a token twice", ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()))
    bad = [what for what, found in problems if found]
    if bad:
        raise StandError(f"n-gram table {path} is damaged: {', '.join(bad)}")


def _rounds(keys: list[tuple]):
    """Index lists over keys in which every key occurs once: the j-th occurrences of each key, j = 0, 1, ..."""
    seen: dict[tuple, int] = {}
    rounds: list[list[int]] = []
    for i, k in enumerate(keys):
        r = seen.get(k, 0)
        seen[k] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(i)
    return rounds
