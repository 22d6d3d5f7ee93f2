"""The llama.cpp backend: a .gguf file run by llama.cpp (through llama-cpp-python's low-level API).

Rows live in one unified KV cache as sequences. A verification pass decodes every row's tree in one
llama batch: each leaf of a row's tree is a sequence of its own (the first leaf is the row's own
sequence; the others borrow free ids and share the row's committed cells by a sequence copy), every
node belongs to the sequences of the leaves below it, and its position is the row's committed length
plus its depth. llama.cpp masks attention by a token's first sequence and position, so a node sees
the row's committed tokens and its own ancestors only. After verification only the accepted path
stays, under the row's own sequence; the borrowed sequences are removed. Equal prompts of a batch
are decoded once and shared by sequence copy.

Flash attention is off: with it, a cache whose cells were removed (holes) gives logits that differ
from sequential decoding; without it they are bit-identical.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from stand.backends.torch import TokenizerText, load_tokenizer
from stand.backends.protocol import PREFILL_CHUNK, OnLogits
from stand.core.tree import DraftTree
from stand.errors import StandError

MAX_SEQUENCES = 256  # llama.cpp's bound on sequence ids in one context
N_BATCH = 4096  # most tokens per llama_decode call (longer prompts go in chunks); llama.cpp splits it in ubatches
N_UBATCH = 512
N_CTX = 16384  # cells of the unified KV cache, shared by every row


def _lib():
    import llama_cpp

    return llama_cpp


@functools.lru_cache(maxsize=1)
def _quiet() -> None:
    """Silences llama.cpp's log (it prints every tensor on load)."""
    ll = _lib()
    cb = ll.llama_log_callback(lambda level, text, data: None)
    _quiet.keep = cb  # the callback must outlive this call
    ll.llama_log_set(cb, ctypes.c_void_p(0))
    ll.llama_backend_init()


def threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Batch:
    """A llama_batch over numpy buffers: up to `capacity` tokens, each in up to `seqs` sequences."""

    def __init__(self, capacity: int, seqs: int):
        ll = _lib()
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq = np.zeros(capacity, dtype=np.int32)
        self.seq = np.zeros((capacity, seqs), dtype=np.int32)  # [capacity, seqs] sequence ids per token
        self.logits = np.zeros(capacity, dtype=np.int8)
        i32 = ctypes.POINTER(ctypes.c_int32)
        self._seq_rows = (i32 * capacity)(*[ctypes.cast(self.seq[i].ctypes.data, i32) for i in range(capacity)])
        self.struct = ll.llama_batch()
        self.struct.token = self.token.ctypes.data_as(i32)
        self.struct.embd = ctypes.POINTER(ctypes.c_float)()
        self.struct.pos = self.pos.ctypes.data_as(i32)
        self.struct.n_seq_id = self.n_seq.ctypes.data_as(i32)
        self.struct.seq_id = ctypes.cast(self._seq_rows, ctypes.POINTER(i32))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def fill_chain(self, tokens, start_pos: int, seq: int, logits: bool, at: int = 0) -> int:
        """Tokens of one sequence at consecutive positions from start_pos, written from slot `at`; returns the end."""
        end = at + len(tokens)
        self.token[at:end] = tokens
        self.pos[at:end] = np.arange(start_pos, start_pos + len(tokens))
        self.n_seq[at:end] = 1
        self.seq[at:end, 0] = seq
        self.logits[at:end] = logits
        return end


@dataclass
class LlamaCppModel(TokenizerText):
    """A loaded GGUF model, its one llama.cpp context, and the tokenizer (the Backend of llama.cpp)."""

    path: str
    tokenizer: object
    n_ctx: int = N_CTX
    flash_attn: bool = False
    kind = "llama.cpp"
    pads = False  # a llama.cpp batch is a flat list of tokens: its cost grows with every token (nothing to pad to)
    max_sequences = MAX_SEQUENCES
    max_pass_tokens = N_BATCH
    generation: int = field(default=0, init=False)  # bumped whenever the KV memory is cleared
    _logits: tuple = field(default=(None, torch.zeros(0, 0)), init=False, repr=False)  # (address, [R, V] view)

    def __post_init__(self):
        _quiet()
        ll = self._ll = _lib()  # kept: __del__ may run while the interpreter shuts down imports
        mp = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(self.path.encode(), mp)
        if not self.model:
            raise StandError(f"llama.cpp could not load {self.path} (truncated file or an architecture it lacks): "
                             "use --backend torch")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.threads = threads()
        self.ctx = ll.llama_init_from_model(self.model, self._context_params())
        if not self.ctx:
            raise StandError(f"llama.cpp could not create a context of {self.n_ctx} cells for {self.path}")
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = Batch(N_BATCH, MAX_SEQUENCES)
        self.name = os.path.basename(self.path)
        self.dtype = self._describe()

    def _context_params(self):
        ll = _lib()
        cp = ll.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = self.n_ctx, N_BATCH, N_UBATCH, MAX_SEQUENCES
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified = True  # one cell pool for all sequences (else each sequence gets n_ctx / n_seq_max)
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        return cp

    def _describe(self) -> str:
        buf = ctypes.create_string_buffer(128)
        _lib().llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode(errors="replace").split()[-1]  # e.g. "Q4_1"

    def __del__(self):
        ll = getattr(self, "_ll", None)
        if ll is None:
            return
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            ll.llama_model_free(self.model)
            self.model = None

    @functools.cached_property
    def vocab_size(self) -> int:
        return int(_lib().llama_vocab_n_tokens(self.vocab))

    @functools.cached_property
    def max_len(self) -> int:
        return min(int(_lib().llama_model_n_ctx_train(self.model)), self.n_ctx)

    @functools.cached_property
    def eos_ids(self) -> set[int]:
        ll = _lib()
        ids = {t for t in range(self.vocab_size) if ll.llama_vocab_is_eog(self.vocab, t)}
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return ids | ({int(eos)} if eos is not None else {int(ll.llama_vocab_eos(self.vocab))})

    def fingerprint(self) -> str:
        """Hash of the file's size and its first MiB (header, vocabulary and the first tensors)."""
        h = hashlib.sha256(str(os.path.getsize(self.path)).encode())
        with open(self.path, "rb") as f:
            h.update(f.read(1 << 20))
        return h.hexdigest()[:16]

    # ---- running ----------------------------------------------------------------------------------

    def clear(self) -> None:
        """Empties the KV memory; caches made before are invalid from now on."""
        _lib().llama_memory_clear(self.memory, True)
        self.generation += 1

    def decode_batch(self, n: int) -> None:
        self.batch.struct.n_tokens = n
        rc = _lib().llama_decode(self.ctx, self.batch.struct)
        if rc == 1:
            raise StandError(f"the llama.cpp context is full ({self.n_ctx} cells for all rows): "
                             "fewer rows or shorter generations")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def logits(self, rows: int) -> torch.Tensor:
        """[rows, V] float32: the logits of the last decode's outputs, a view of llama.cpp's buffer (a view of its
        current address is kept and re-made when the buffer moves or the view is too short)."""
        address = ctypes.cast(_lib().llama_get_logits(self.ctx), ctypes.c_void_p).value
        at, view = self._logits
        if address != at or len(view) < rows:
            array = (ctypes.c_float * (rows * self.vocab_size)).from_address(address)
            view = torch.from_numpy(np.ctypeslib.as_array(array)).view(rows, self.vocab_size)
            self._logits = address, view
        return view[:rows]

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        _lib().llama_memory_seq_rm(self.memory, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        _lib().llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def new_cache(self) -> "LlamaCache":
        self.clear()
        return LlamaCache(self)

    @torch.inference_mode()
    def next_logits(self, contexts: list[list[int]]) -> torch.Tensor:
        """Each context decoded as a sequence of its own, MAX_SEQUENCES at a time (the KV memory is cleared)."""
        L = len(contexts[0]) if contexts else 0
        per = max(min(MAX_SEQUENCES, N_BATCH // max(L, 1)), 1)
        out = []
        for lo in range(0, len(contexts), per):
            self.clear()
            at = 0
            for s, ctx in enumerate(contexts[lo:lo + per]):
                at = self.batch.fill_chain(ctx, 0, s, False, at)
                self.batch.logits[at - 1] = 1
            self.decode_batch(at)
            out.append(self.logits(min(per, len(contexts) - lo)).clone())
        self.clear()
        return torch.cat(out) if out else torch.zeros(0, self.vocab_size)


class LlamaCache:
    """The rows of one engine run as sequences of the model's unified KV cache (see the module docstring)."""

    def __init__(self, llm: LlamaCppModel):
        self.llm, self.generation = llm, llm.generation
        self.seqs: list[int] = []  # [B] each row's own sequence id
        self.lengths: list[int] = []  # [B] committed tokens in the cache per row
        self.free = list(range(MAX_SEQUENCES - 1, -1, -1))  # sequence ids not in use (pop from the end)
        self.borrowed: list[int] = []  # leaf sequences of the last step
        self.leaf_of: list[list[int]] = []  # [B][node] a sequence id of a leaf below each node of the last step
        self.parked: set[int] = set()  # sequences of ended rows whose cells later rows may share (park)

    def _check(self) -> None:
        if self.generation != self.llm.generation:
            raise RuntimeError("this llama.cpp cache was invalidated: the model ran another cache since")

    @torch.inference_mode()
    def prefill(self, prefixes: list[list[int]], on_logits: OnLogits | None = None,
                reuse: list[tuple[int, int] | None] | None = None) -> None:
        self._check()
        if len(self.seqs) + len(self.parked) + len(prefixes) > MAX_SEQUENCES:
            raise StandError(f"llama.cpp holds at most {MAX_SEQUENCES} sequences; the batch would have "
                             f"{len(self.seqs) + len(self.parked) + len(prefixes)} rows and kept prefixes")
        base = len(self.seqs)
        first: dict[tuple, int] = {}  # prefix -> the row that decodes it
        for row, p in enumerate(prefixes):
            self.seqs.append(self.free.pop())
            self.lengths.append(len(p))
            first.setdefault(tuple(p), row)
        for key, row in first.items():
            members = [r for r, p in enumerate(prefixes) if first[tuple(p)] == row]
            seq, start = self.seqs[base + row], 0
            if reuse and reuse[row]:  # its first cells shared with a parked sequence: no prefill for them
                parked, start = reuse[row]
                self.llm.seq_cp(parked, seq, 0, start)
            self._decode_prompt(list(key), seq, members, on_logits, start)
            for r in members[1:]:
                self.llm.seq_cp(seq, self.seqs[base + r])  # shares the cells: no second prefill

    def _decode_prompt(self, prompt: list[int], seq: int, members: list[int], on_logits: OnLogits | None,
                       start: int = 0) -> None:
        """Decodes prompt[start:] into sequence `seq` in chunks (PREFILL_CHUNK tokens when its logits are wanted)."""
        chunk = N_BATCH if on_logits is None else PREFILL_CHUNK
        for lo in range(start, len(prompt), chunk):
            part = prompt[lo:lo + chunk]
            n = self.llm.batch.fill_chain(part, lo, seq, on_logits is not None)
            self.llm.decode_batch(n)
            if on_logits is not None:
                on_logits(members, lo, self.llm.logits(n))

    def park(self, row: int) -> tuple[int, int]:
        """Row `row`'s cells outlive it (keep() leaves its sequence alone): (its sequence, cached positions)."""
        self.parked.add(self.seqs[row])
        return self.seqs[row], self.lengths[row]

    def unpark(self, handle: int) -> None:
        self._check()
        if handle in self.parked:
            self.parked.discard(handle)
            self.llm.seq_rm(handle)
            self.free.append(handle)

    @torch.inference_mode()
    def step(self, trees: list[DraftTree], roots: list[int], width: int | None = None) -> list[torch.Tensor]:
        """width: ignored (pads is False, the engine never widens a pass here)."""
        self._check()
        b = self.llm.batch
        at, spans = 0, []
        self.leaf_of = []
        for row, (tree, root) in enumerate(zip(trees, roots)):
            if at + len(tree) + 1 > b.capacity:
                raise StandError(f"a verification pass over llama.cpp holds at most {b.capacity} tokens")
            end = self._fill_tree(tree, root, row, at)
            spans.append((at, end))
            at = end
        self.llm.decode_batch(at)
        logits = self.llm.logits(at)  # [N, V] a view, valid until the next decode
        return [logits[s:e] for s, e in spans]

    def _fill_tree(self, tree: DraftTree, root: int, row: int, at: int) -> int:
        """Writes row `row`'s root and tree into the batch from slot `at`; returns the end."""
        seq, L = self.seqs[row], self.lengths[row]
        n = len(tree) + 1
        below = self._leaf_sequences(tree, seq)  # [n] sorted sequence ids of the leaves below each node
        b = self.llm.batch
        b.token[at] = root
        b.token[at + 1:at + n] = tree.tokens
        b.pos[at:at + n] = L + np.concatenate([[0], tree.depths()])
        b.logits[at:at + n] = 1
        for i, ids in enumerate(below):
            b.n_seq[at + i] = len(ids)
            b.seq[at + i, : len(ids)] = ids
        self.leaf_of.append([ids[0] for ids in below])
        return at + n

    def _leaf_sequences(self, tree: DraftTree, seq: int) -> list[list[int]]:
        """Per node (root first), the sequences of the leaves below it; the first leaf is the row's own sequence,
        the others borrow free ids that start as copies of the row's committed cells."""
        kids = tree.children()
        below: list[list[int]] = [[] for _ in kids]
        own = True
        for node in range(len(kids) - 1, -1, -1):  # children come after parents: walk backwards
            if kids[node]:
                below[node] = sorted({s for c in kids[node] for s in below[c]}, key=lambda s: s != seq)
                continue
            below[node] = [self._leaf_sequence(seq, own)]
            own = False
        return below

    def _leaf_sequence(self, seq: int, own: bool) -> int:
        if own:
            return seq
        if not self.free:
            raise StandError(f"the pass needs more than llama.cpp's {MAX_SEQUENCES} sequences: smaller trees")
        leaf = self.free.pop()
        self.llm.seq_cp(seq, leaf)
        self.borrowed.append(leaf)
        return leaf

    def commit(self, paths: list[list[int]]) -> None:
        """Row b keeps the cells of its accepted path under its own sequence; borrowed leaves are returned."""
        self._check()
        for row, path in enumerate(paths):
            seq, L = self.seqs[row], self.lengths[row]
            keep_to = L + len(path)  # positions [L, keep_to) hold the root and the accepted nodes
            leaf = self.leaf_of[row][path[-1]]
            if leaf == seq:
                self.llm.seq_rm(seq, keep_to, -1)
            else:
                self.llm.seq_rm(seq, L, -1)
                self.llm.seq_cp(leaf, seq, L, keep_to)
            self.lengths[row] = keep_to
        for leaf in self.borrowed:
            self.llm.seq_rm(leaf)
            self.free.append(leaf)
        self.borrowed = []

    def keep(self, rows: list[int]) -> None:
        self._check()
        for row in sorted(set(range(len(self.seqs))) - set(rows)):
            if self.seqs[row] not in self.parked:
                self.llm.seq_rm(self.seqs[row])
                self.free.append(self.seqs[row])
        self.seqs = [self.seqs[i] for i in rows]
        self.lengths = [self.lengths[i] for i in rows]


@functools.lru_cache(maxsize=2)
def load_llamacpp(path: str, n_ctx: int = N_CTX, flash_attn: bool = False) -> LlamaCppModel:
    return LlamaCppModel(path, load_tokenizer(path), n_ctx, flash_attn)
