"""The N-Grammys: learning-free drafts from the model's weights and from the context (arXiv 2411.03786).

Model tables (built once per model, cached on disk): the bigram table holds, for every token v, the
top-k next tokens of the model given v alone; the unigram is the model's mean next-token
distribution over all v. Context n-grams: every earlier occurrence of the last n tokens (n = max_n
down to 1), most recent first. The k draft slots are filled by mixing strategies (context matches,
then the bigram successors of the last token, then unigram tokens), each draft extended to its
length by the bigram chain; the slots are verified together as one tree with shared prefixes.
Drafts are deterministic (one-hot q).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from stand.core.files import atomic_path, cache_dir
from stand.errors import StandError
from stand.core.tree import DraftTree, graft
from stand.core.drafter import Drafter
from stand.drafters.pld import earlier_matches

BIGRAM_K = 16  # successors kept per token
CHUNK = 512  # tokens per forward pass when building the table


@dataclass
class NGrammysOptions:
    slots: int = 8  # drafts verified together per step
    length: int = 6  # tokens per draft
    max_n: int = 4  # longest context suffix looked up


@dataclass
class ModelTables:
    bigram: np.ndarray  # [V, K] int64: top-K next tokens given each token alone, best first
    bigram_probs: np.ndarray  # [V, K] float32
    unigram: np.ndarray  # [K] int64: top-K tokens of the mean next-token distribution

    @property
    def vocab_size(self) -> int:
        return self.bigram.shape[0]


# ---------------------------------------------------------------------------------------------
# Building and caching the model tables


def table_path(target, k: int) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", target.name)[:60]
    return os.path.join(cache_dir(), f"bigram-{name}-v{target.vocab_size}-k{k}-{target.fingerprint()}.npz")


@torch.inference_mode()
def build_tables(target, k: int = BIGRAM_K, chunk: int = CHUNK, progress: bool = True) -> ModelTables:
    """One batched pass over the vocabulary: each token alone, as a sequence of length one."""
    from tqdm.auto import tqdm

    V = target.vocab_size
    k = min(k, V)
    ids = np.zeros((V, k), dtype=np.int64)
    probs = np.zeros((V, k), dtype=np.float32)
    mean = torch.zeros(V, dtype=torch.float64)
    for lo in tqdm(range(0, V, chunk), desc="N-Grammys bigram table", unit="chunk", disable=not progress):
        hi = min(lo + chunk, V)
        logits = target.next_logits([[t] for t in range(lo, hi)])  # [C, V]
        p = torch.softmax(logits, dim=-1)
        top = torch.topk(p, k, dim=-1)
        ids[lo:hi], probs[lo:hi] = top.indices.numpy(), top.values.numpy()
        mean += p.sum(0).double()
    unigram = torch.topk(mean, k).indices.numpy().astype(np.int64)
    return ModelTables(ids, probs, unigram)


def save_tables(tables: ModelTables, path: str) -> None:
    with atomic_path(path, ".npz") as tmp:  # concurrent builders never see half a file
        np.savez(tmp, bigram=tables.bigram, bigram_probs=tables.bigram_probs, unigram=tables.unigram)


def load_tables(path: str) -> ModelTables:
    try:
        with np.load(path) as z:
            return ModelTables(z["bigram"], z["bigram_probs"], z["unigram"])
    except (OSError, KeyError, ValueError) as e:
        raise StandError(f"could not read the N-Grammys table cache {path}: {e} (delete it to rebuild)") from e


def model_tables(target, k: int = BIGRAM_K, progress: bool = True) -> ModelTables:
    """The model's tables from the disk cache, built (and cached) on first use."""
    k = min(k, target.vocab_size)
    path = table_path(target, k)
    if os.path.exists(path):
        return load_tables(path)
    tables = build_tables(target, k, progress=progress)
    try:
        save_tables(tables, path)
    except OSError:
        pass  # a read-only cache only costs a rebuild next time
    return tables


# ---------------------------------------------------------------------------------------------
# Draft strategies: each returns token lists, best first


def context_drafts(tokens: np.ndarray, max_n: int, length: int, limit: int) -> list[list[int]]:
    """Distinct continuations after earlier occurrences of the last n tokens (longest n first, then most recent)."""
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for start in earlier_matches(tokens, max_n):
        cont = tuple(tokens[start:start + length].tolist())
        if cont not in seen:
            seen.add(cont)
            out.append(list(cont))
            if len(out) == limit:
                break
    return out


def bigram_chain(tables: ModelTables, first: int, length: int) -> list[int]:
    """first, then the bigram argmax of each token, up to length tokens."""
    chain = [int(first)]
    while len(chain) < length:
        chain.append(int(tables.bigram[chain[-1], 0]))
    return chain


def extend(tables: ModelTables | None, draft: list[int], length: int) -> list[int]:
    """Completes a short draft by the bigram chain of its last token."""
    if tables is None or not draft or len(draft) >= length:
        return draft
    return draft + bigram_chain(tables, draft[-1], length - len(draft) + 1)[1:]


def context_unigram(tokens: np.ndarray, k: int) -> list[int]:
    """Without model tables: the row's most frequent tokens."""
    ids, counts = np.unique(tokens, return_counts=True)
    return ids[np.argsort(-counts, kind="stable")[:k]].tolist()


def mix_drafts(tokens: np.ndarray, tables: ModelTables | None, slots: int, length: int, max_n: int) -> list[list[int]]:
    """Fills the slots: context matches (up to half), bigram successors of the last token, then unigrams."""
    drafts = [extend(tables, d, length) for d in context_drafts(tokens, max_n, length, max(1, slots // 2))]
    firsts = {d[0] for d in drafts}
    if tables is not None:
        successors = tables.bigram[int(tokens[-1])].tolist()
        unigram = tables.unigram.tolist()
    else:
        successors, unigram = [], context_unigram(tokens, slots)
    for t in successors + unigram:
        if len(drafts) >= slots:
            break
        if t not in firsts:
            firsts.add(t)
            drafts.append(bigram_chain(tables, t, length) if tables is not None else [t])
    return drafts


def trie(drafts: list[list[int]]) -> DraftTree:
    """One tree with shared prefixes; siblings keep the order of the drafts that introduced them."""
    tree = DraftTree()
    for d in drafts:
        tree, _ = graft(tree, DraftTree.chain(d))
    return tree


# ---------------------------------------------------------------------------------------------
# The drafter


class NGrammys(Drafter):
    name = "ngrammys"
    Options = NGrammysOptions

    def __init__(self, config, vocab_size: int, tables: ModelTables | None = None):
        super().__init__(config, vocab_size)
        self.tables = None
        if tables is not None:
            self.set_tables(tables)

    def prepare(self, target) -> None:
        """Called by make_drafter with the target: builds or loads the model tables."""
        self.set_tables(model_tables(target))

    def set_tables(self, tables: ModelTables) -> None:
        if tables.vocab_size != self.vocab_size:
            raise StandError(f"N-Grammys tables cover {tables.vocab_size} tokens, the model has {self.vocab_size}")
        self.tables = tables

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        tokens = np.asarray(row.tokens, dtype=np.int64)
        if len(tokens) == 0:
            return DraftTree()
        o = self.options
        if self.config.nodes is None or max_nodes is None:
            return trie(mix_drafts(tokens, self.tables, o.slots, o.length, o.max_n))
        slots = max(o.slots, -(-2 * max_nodes // o.length))  # an equal budget: enough drafts to fill it, then cut
        return trie(mix_drafts(tokens, self.tables, slots, o.length, o.max_n)).prefix(max_nodes)

    def memory_bytes(self) -> int:
        t = self.tables
        return 0 if t is None else t.bigram.nbytes + t.bigram_probs.nbytes + t.unigram.nbytes
