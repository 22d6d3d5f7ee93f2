from dataclasses import dataclass
import os

import numpy as np
import pytest

from stand.errors import StandError
from stand.drafters.ngram_table import NGramTable, merge_topk, tails_of

BOB, MARY, TOM, SUE = 11, 12, 13, 14


@dataclass
class Lookup:
    """Where a batch of contexts matched: slot [B] (-1 = no match) and the order n that matched [B]."""

    slot: np.ndarray
    order: np.ndarray


def lookup(table: NGramTable, tails) -> Lookup:
    """Longest-match backoff for every context tail [B, max_n]: the longest stored suffix key."""
    found = [table.longest(t) for t in np.asarray(tails, dtype=np.int64).tolist()]
    return Lookup(np.array([f[0] for f in found], dtype=np.int64), np.array([f[1] for f in found], dtype=np.int64))


def get(table: NGramTable, key):
    """Exact lookup of one key (1..max_n tokens): (ids, probs, count) or None."""
    key = [int(x) for x in key]
    assert 1 <= len(key) <= table.max_n
    s = table.index.get(tuple([-1] * (table.max_n - len(key)) + key))
    if s is None:
        return None
    ids, p = table.dist(s)
    return ids, p, int(table.counts[s])


def test_merge_worked_example():
    t = NGramTable(max_n=1, topk=4, capacity=64)
    t.insert([[7]], [[BOB, MARY, TOM]], [[0.7, 0.2, 0.05]])
    t.insert([[7]], [[BOB, MARY, SUE]], [[0.3, 0.6, 0.05]])
    ids, probs, count = get(t, [7])
    got = dict(zip(ids.tolist(), probs.tolist()))
    assert count == 2
    assert got == pytest.approx({BOB: 0.5, MARY: 0.4, TOM: 0.025, SUE: 0.025})
    assert ids.tolist()[:2] == [BOB, MARY]


def test_merge_cuts_to_topk():
    ids, p = merge_topk(np.array([[1, 2, -1]]), np.array([[0.6, 0.3, 0.0]]), np.array([1]),
                        np.array([[3, 4, 1]]), np.array([[0.5, 0.4, 0.1]]), 3)
    assert ids.tolist() == [[1, 3, 4]]
    assert p[0] == pytest.approx([0.35, 0.25, 0.2])


def test_orders_and_longest_match():
    t = NGramTable(max_n=3, topk=2, capacity=64)
    t.insert(tails_of(np.array([5, 6, 7]), 3)[-1:], [[1, 2]], [[0.9, 0.1]])  # keys (7), (6 7), (5 6 7)
    assert get(t, [7]) is not None and get(t, [6, 7]) is not None and get(t, [5, 6, 7]) is not None
    t.insert([[-1, 9, 7]], [[3, 4]], [[0.8, 0.2]])  # keys (7), (9 7)
    look = lookup(t, np.array([[5, 6, 7], [8, 9, 7], [0, 0, 7], [0, 0, 1]]))
    assert look.order.tolist() == [3, 2, 1, 0]
    assert look.slot[3] == -1
    assert t.dist(look.slot[0])[0].tolist() == [1, 2]
    assert t.dist(look.slot[1])[0].tolist() == [3, 4]
    assert get(t, [7])[2] == 2


def test_duplicates_in_one_batch_merge_sequentially():
    a = NGramTable(max_n=2, topk=3, capacity=64)
    b = NGramTable(max_n=2, topk=3, capacity=64)
    tails = np.array([[1, 2], [3, 2], [1, 2]])
    ids = np.array([[5, 6, 7], [6, 8, 9], [9, 5, 1]])
    probs = np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1], [0.4, 0.4, 0.1]])
    a.insert(tails, ids, probs)
    for i in range(3):
        b.insert(tails[i:i + 1], ids[i:i + 1], probs[i:i + 1])
    for key in ([2], [1, 2], [3, 2]):
        ga, gb = get(a, key), get(b, key)
        assert ga[0].tolist() == gb[0].tolist() and ga[2] == gb[2]
        assert ga[1] == pytest.approx(gb[1])
    assert get(a, [2])[2] == 3


def test_eviction_bounded_and_never_stale():
    cap = 64
    t = NGramTable(max_n=1, topk=2, capacity=cap)
    rng = np.random.default_rng(0)
    truth = {}
    for step in range(40):
        keys = rng.choice(10_000, size=10, replace=False)
        nxt = rng.integers(0, 50_000, size=10)
        t.insert(keys[:, None], np.stack([nxt, nxt + 1], 1), np.full((10, 2), 0.5))
        for k, n in zip(keys.tolist(), nxt.tolist()):
            truth.setdefault(k, []).append(n)
        assert len(t) <= cap and int((t.counts > 0).sum()) == len(t) <= cap
    assert t.evictions > 0
    misses = 0
    for k, firsts in truth.items():
        got = get(t, [k])
        if got is None:
            misses += 1
            continue
        assert set(got[0].tolist()) <= set(firsts) | {f + 1 for f in firsts}  # only this key's own data
    assert misses >= len(truth) - cap
    look = lookup(t, np.array(list(truth))[:, None])
    assert ((look.slot >= 0).sum()) == len(truth) - misses


def test_recent_keys_survive_eviction():
    t = NGramTable(max_n=1, topk=1, capacity=16)
    for k in range(100):
        t.insert([[k]], [[k + 1]], [[1.0]])
    assert get(t, [99]) is not None and get(t, [98]) is not None
    assert get(t, [0]) is None


def test_memory_is_fixed_and_reported():
    t = NGramTable(max_n=4, topk=10, capacity=1024)
    m0 = t.memory_bytes()
    assert m0 > 1024 * (4 * 4 + 10 * 8)
    t.insert(tails_of(np.arange(200), 4), np.tile(np.arange(10), (200, 1)), np.full((200, 10), 0.1))
    assert t.memory_bytes() < 2 * m0


def _filled(n=300, max_n=3):
    t = NGramTable(max_n=max_n, topk=4, capacity=4096)
    rng = np.random.default_rng(1)
    toks = rng.integers(0, 20, size=n)
    p = rng.dirichlet(np.ones(4), size=n)
    ids = np.argsort(rng.random((n, 100)), axis=1)[:, :4]  # 4 distinct tokens per distribution, as a top-k has
    t.insert(tails_of(toks, max_n), ids, p)
    return t


def test_save_load_roundtrip(tmp_path):
    t = _filled()
    path = str(tmp_path / "t.ngt")
    t.save(path, meta={"model": "x"})
    u, meta = NGramTable.load(path)
    assert meta == {"model": "x"} and len(u) == len(t)
    probe = np.random.default_rng(2).integers(-1, 20, size=(200, 3))
    probe[:, -1] = np.abs(probe[:, -1])
    la, lb = lookup(t, probe), lookup(u, probe)
    assert (la.order == lb.order).all()
    for sa, sb in zip(la.slot, lb.slot):
        if sa >= 0:
            assert t.dist(sa)[0].tolist() == u.dist(sb)[0].tolist()
            assert t.dist(sa)[1].tolist() == u.dist(sb)[1].tolist()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".ngt-")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "empty"])
def test_load_refuses_damaged_files(tmp_path, damage):
    path = tmp_path / "t.ngt"
    _filled().save(str(path))
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x40
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "foreign":
        raw = bytearray(b'{"format": "something else"}')
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(StandError):
        NGramTable.load(str(path))


def crafted_table(path, header: dict) -> str:
    """A table file with a valid checksum, this header and no entries."""
    import hashlib
    import json
    import struct

    from stand.drafters.ngram_table import FORMAT_VERSION, MAGIC

    hb = json.dumps(header).encode()
    data = MAGIC + struct.pack("<II", FORMAT_VERSION, len(hb)) + hb
    path.write_bytes(data + hashlib.sha256(data).digest())
    return str(path)


def test_crafted_table_file_allocates_nothing_before_the_options_check(tmp_path):
    """A 100-byte file whose header asks for max_n 64 and topk 4096 (some 8 GiB at the drafter's capacity) is refused
    before its arrays are allocated."""
    import tracemalloc

    from stand.drafters.ngram_table import TableMismatch
    from stand.drafters.registry import make_drafter
    from stand.params import SpecConfig

    path = crafted_table(tmp_path / "evil.ngt", {"max_n": 64, "topk": 4096, "n": 0})
    assert os.path.getsize(path) < 150
    tracemalloc.start()
    try:
        with pytest.raises(TableMismatch, match="max_n=64, topk=4096"):
            make_drafter(SpecConfig(method="stand", table_path=path), 259)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    with pytest.raises(StandError, match="capacity"):  # read without options: its size is bounded all the same
        NGramTable.load(crafted_table(tmp_path / "big.ngt", {"max_n": 64, "topk": 4096, "n": 0, "capacity": 1 << 20}))


def test_a_batch_of_more_keys_than_slots_keeps_its_last_ones():
    """Inserting more keys at once than the table holds keeps the batch's latest keys (as eviction would), not an
    error: a long prompt into a small table."""
    t = NGramTable(max_n=2, topk=2, capacity=8)
    tails = tails_of(np.arange(1, 21), 2)  # [20, 2]: 39 keys
    t.insert(tails, np.tile([[7, 8]], (20, 1)), np.tile([[0.6, 0.4]], (20, 1)))
    assert len(t) == 8 and t.evictions == 0
    assert t.longest((19, 20))[1] == 2 and t.longest((1, 2))[1] == 0
