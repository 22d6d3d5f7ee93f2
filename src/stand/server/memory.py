"""What requests cost in memory, and the budget they share.

Every running request is a Need (its rows, its longest row, its KV tokens, its prompt positions, its drafter
groups); a set of them takes, at most, the Footprint below, counted as the code allocates it:
- KV on torch: every row of the batch is padded to the longest (backends/kv.py), plus one pass's tree tokens and
  the slots the cache grows by; the lean cache holds up to three copies at once while rows join or leave
  (LeanCache.extend: the old cache beside both sides padded and their concatenation, then beside the
  concatenation and the new cache; keep_rows: the old, the gathered rows and the new), the Hugging Face cache one
  (it copies a layer at a time). On llama.cpp the cells are allocated once at start (they are in the server's own memory);
  what bounds them is their count (`capacity`), and the samples of a prompt share its cells.
- a pass: the logits, probabilities and a temporary of its tokens (rows + STEP_TOKENS), and on torch the attention
  scores of a layer (tokens x heads x slots, twice); a prefill chunk: PREFILL_CHUNK positions of full
  distributions, CHUNK_COPIES times over, and its attention scores.
- prompt distributions: drafters that learn from the prompt (stand, recycle, consensus) keep the top k of the
  model's distribution after every prompt token, per row (16 k + 8 bytes a position).
- tables: one full n-gram table per drafter group (none with a shared table: that one is counted once, at start),
  and one full table of its own per row where the drafter keeps one (STAND's own_latest).
The server's budget (MemoryBudget) is what requests may take together: --memory-budget, or BUDGET_SHARE of the
memory free once the model is loaded. A request whose footprint alone is over it gets 400 with the numbers; one
that fits alone waits until the running ones leave it room. `stand serve --help` shows the largest request's
footprint for the default model.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from stand.backends.protocol import PREFILL_CHUNK

CHUNK_COPIES = 4
PASS_COPIES = 3
STEP_TOKENS = 64  # SpecConfig.step_tokens: tree tokens of one pass over all rows
KV_MARGIN = 512  # llama.cpp cells kept free for the trees of a pass
LEAN_KV_COPIES, HF_KV_COPIES = 3, 1
BUDGET_SHARE = 0.8  # of the memory free after loading, what requests may take by default


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a request depends on."""

    name: str
    kv_bytes_per_token: int
    vocab_size: int
    max_len: int  # the context
    prompt_shared: bool  # the samples of a prompt share its KV (llama.cpp)
    capacity: int | None  # KV tokens of all requests together (llama.cpp's cells), None: no fixed bound
    table_bytes: int  # one full drafter table (0: the method keeps none per request)
    prompt_topk: int  # tokens of the prompt's distributions the drafter keeps per position (0: none)
    kv_copies: int = 0  # copies of the padded KV cache at once (0: the cells are allocated at start, llama.cpp)
    heads: int = 0  # attention heads whose scores a torch pass computes (0: none counted)
    grow_slots: int = 0  # slots the torch cache grows by at once
    row_table_bytes: int = 0  # a full table of a row's own (0: the drafter keeps none per row)


# SmolLM2-135M-Instruct on llama.cpp (30 layers x 3 KV heads x 64 dims x K,V x f16) with the stand drafter's
# default tables (2^18 slots a question, 2^13 a row); tests/test_server_limits.py checks these against the loaded model.
DEFAULT_SHAPE = ModelShape("SmolLM2-135M-Instruct (llama.cpp)", 23040, 49152, 8192, True, 16384 - KV_MARGIN,
                           70_254_712, 10, row_table_bytes=2_162_800)


@dataclass(frozen=True)
class Need:
    """What one request holds while it runs."""

    rows: int
    longest: int  # tokens of its longest row at the end (prompt and new tokens, within the context)
    kv_tokens: int  # KV tokens it holds at its end (kv_tokens)
    prompt_positions: int  # prompt tokens over all its rows (their prompt distributions)
    groups: int  # drafter groups (one per prompt)


def need_of(prompt_lens: list[int], n: int, new_tokens: int, shape: ModelShape) -> Need:
    """The Need of n samples of each prompt, new_tokens each at most."""
    longest = max(min(p + new_tokens, shape.max_len) for p in prompt_lens)
    return Need(len(prompt_lens) * n, longest, kv_tokens(prompt_lens, n, new_tokens, shape), n * sum(prompt_lens),
                len(prompt_lens))


def kv_tokens(prompt_lens: list[int], rows_per_prompt: int, new_tokens: int, shape: ModelShape) -> int:
    """KV tokens a request holds at its end: prompts plus every row's new tokens (bounded by the context)."""
    total = 0
    for p in prompt_lens:
        new = max(min(new_tokens, shape.max_len - p), 0)
        total += p + rows_per_prompt * new if shape.prompt_shared else rows_per_prompt * (p + new)
    return total


@dataclass
class Footprint:
    kv_tokens: int
    kv: int
    prompt_probs: int
    pass_bytes: int
    tables: int

    @property
    def total(self) -> int:
        return self.kv + self.prompt_probs + self.pass_bytes + self.tables

    def line(self) -> str:
        kv = f"KV {mib(self.kv)} for {self.kv_tokens:,} tokens" if self.kv else f"KV {self.kv_tokens:,} cells"
        return (f"{mib(self.total)} ({kv}, prompt distributions {mib(self.prompt_probs)}, passes "
                f"{mib(self.pass_bytes)}, drafter tables {mib(self.tables)})")


def footprint(needs: list[Need], shape: ModelShape, shared_table: bool = False) -> Footprint:
    """The most memory these requests take together while they run (see the module docstring)."""
    rows, longest = sum(n.rows for n in needs), max((n.longest for n in needs), default=0)
    slots = longest + STEP_TOKENS + shape.grow_slots
    kv = shape.kv_copies * rows * slots * shape.kv_bytes_per_token
    width, vocab = rows + STEP_TOKENS, shape.vocab_size
    passes = PASS_COPIES * width * vocab * 4 + 2 * width * shape.heads * slots * 4
    prefill = CHUNK_COPIES * min(PREFILL_CHUNK, longest) * vocab * 4 + 2 * PREFILL_CHUNK * shape.heads * slots * 4
    probs = sum(n.prompt_positions for n in needs) * (16 * shape.prompt_topk + 8) if shape.prompt_topk else 0
    tables = (0 if shared_table else sum(n.groups for n in needs) * shape.table_bytes) + rows * shape.row_table_bytes
    return Footprint(sum(n.kv_tokens for n in needs), kv, probs, passes + prefill, tables)


def worst_case(max_n: int, max_prompt_tokens: int, max_tokens: int, shape: ModelShape,
               shared_table: bool = False) -> Footprint:
    """The footprint of the largest request within the limits (max_n rows of one prompt, or max_n prompts)."""
    prompt = min(max_prompt_tokens, shape.max_len - 1)
    one = footprint([need_of([prompt], max_n, max_tokens, shape)], shape, shared_table)
    many = footprint([need_of([prompt] * max_n, 1, max_tokens, shape)], shape, shared_table)
    return max(one, many, key=lambda f: f.total)


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


@dataclass
class MemoryBudget:
    """What the running requests may take together: `limit` bytes, and at most `capacity` KV tokens."""

    shape: ModelShape
    limit: int
    shared_table: bool = False

    def over(self, needs: list[Need]) -> str | None:
        """Why these requests cannot run together (None: they can)."""
        fp = footprint(needs, self.shape, self.shared_table)
        if self.shape.capacity is not None and fp.kv_tokens > self.shape.capacity:
            return (f"{fp.kv_tokens:,} tokens in the KV cache (prompts and n x max_tokens); the server holds "
                    f"{self.shape.capacity:,} for all requests")
        if fp.total > self.limit:
            return f"{fp.line()}; the server's requests share {mib(self.limit)}"
        return None

    def fits(self, needs: list[Need]) -> bool:
        return self.over(needs) is None


def free_bytes() -> int | None:
    """Memory this process could still take: MemAvailable, bounded by its cgroup's limit (None: unknown)."""
    free = _meminfo("MemAvailable")
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                room = int(limit) - int(g.read())
                free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free


def rss_bytes() -> int:
    """This process's resident memory."""
    return (_meminfo("VmRSS", "/proc/self/status") or 0)


def _meminfo(field: str, path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError):
        return None


def describe(config, shape: ModelShape = DEFAULT_SHAPE) -> str:
    """One line: the worst case of a request under `config` (a ServerConfig) on a model of `shape`."""
    worst = worst_case(config.max_n, config.max_prompt_tokens, config.max_tokens_limit, shape, config.shared_table)
    cap = f"; the KV cache holds {shape.capacity:,} tokens for all requests" if shape.capacity else ""
    return (f"worst case per request on {shape.name} (n={config.max_n}, prompt {config.max_prompt_tokens:,}, "
            f"max_tokens {config.max_tokens_limit:,}): {worst.line()}{cap}")


def budget_line(budget: MemoryBudget, free: int | None, given: bool, rss: int) -> str:
    """The start-up line: what requests may take, where that figure comes from, and the server's own memory."""
    source = ("set by --memory-budget" if given else
              f"{BUDGET_SHARE:.0%} of the {mib(free)} free at start" if free else "a guess: free memory unknown")
    return (f"memory budget: requests may take {mib(budget.limit)} together ({source}); the server holds "
            f"{mib(rss)} now, so at most {mib(rss + budget.limit)} in all")


def serve_help() -> str:
    """`stand serve --help`: what the server does, and the worst case of a request with the default limits."""
    from stand.server.config import ServerConfig

    return ("OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics). "
            "Requests join the running batch between steps (continuous batching); a request beyond a --max-* "
            f"limit gets 400 naming the field.\n\nWith the defaults, the {describe(ServerConfig())}. "
            "The startup log shows the figure for the model served.")


# ---- the shape of a loaded model --------------------------------------------------------------------------


def shape_of(target, drafter, config) -> ModelShape:
    """The shape of a loaded backend (llama.cpp or torch) and drafter; config: max_live_tokens may bound it."""
    llama = getattr(target, "kind", "") == "llama.cpp"
    capacity = target.n_ctx - KV_MARGIN if llama else None
    if config.max_live_tokens is not None:
        capacity = min(config.max_live_tokens, capacity or config.max_live_tokens)
    shape = ModelShape(f"{target.name} ({target.kind})", _llama_kv_bytes(target) if llama else _torch_kv_bytes(target),
                       target.vocab_size, target.max_len, llama, capacity, table_bytes(drafter),
                       min(drafter.prompt_topk(), target.vocab_size), row_table_bytes=row_table_bytes(drafter))
    return shape if llama else dataclasses.replace(shape, **_torch_copies(target))


def _torch_copies(target) -> dict:
    """How the torch backend's cache grows and copies (see the module docstring), and the attention heads."""
    from stand.backends.lean import CACHE_CHUNK

    lean = hasattr(target, "lean")
    return {"kv_copies": LEAN_KV_COPIES if lean else HF_KV_COPIES, "grow_slots": CACHE_CHUNK if lean else 0,
            "heads": int(target.model.config.num_attention_heads)}


def _llama_kv_bytes(target) -> int:
    import llama_cpp as ll

    layers, heads = ll.llama_model_n_layer(target.model), ll.llama_model_n_head(target.model)
    head_dim = ll.llama_model_n_embd(target.model) // heads
    return layers * 2 * ll.llama_model_n_head_kv(target.model) * head_dim * 2  # K and V in f16


def _torch_kv_bytes(target) -> int:
    lean = getattr(target, "lean", None)  # the lean forwards keep their own cache (int4: float32)
    if lean is not None:
        return lean.kv_bytes_per_token
    cfg = target.model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return cfg.num_hidden_layers * 2 * kv_heads * head_dim * next(target.model.parameters()).element_size()


def table_bytes(drafter) -> int:
    """A full n-gram table of the drafter's options (0 for drafters without one)."""
    o = _table_options(drafter)
    return 0 if o is None else _full_table_bytes(o.max_n, o.topk, o.capacity)


def row_table_bytes(drafter) -> int:
    """A full table of a row's own (STAND's own_latest), 0 where the drafter keeps none."""
    o = _table_options(drafter)
    return _full_table_bytes(o.max_n, o.topk, o.own_capacity) if getattr(o, "own_latest", False) else 0


def _table_options(drafter):
    """The options of a drafter that keeps n-gram tables, else None."""
    o = getattr(drafter, "options", None)
    if not hasattr(drafter, "save_table") or not all(hasattr(o, k) for k in ("max_n", "topk", "capacity")):
        return None
    return o


def _full_table_bytes(max_n: int, topk: int, capacity: int) -> int:
    """The table's own accounting with every slot indexed, plus the index dict's slots."""
    from stand.drafters.ngram_table import NGramTable

    empty = NGramTable(max_n, topk, capacity).memory_bytes()
    return empty + capacity * (56 + 8 * max_n) + _dict_bytes(capacity)


def _dict_bytes(entries: int) -> int:
    """sys.getsizeof of a dict of `entries` keys, without building it: a table of the next power of two of
    3/2 x entries, with 1-, 2- or 4-byte indices and 24-byte entries for two thirds of it."""
    size = 8
    while size * 2 < entries * 3:
        size *= 2
    index = 1 if size <= 128 else 2 if size <= 1 << 15 else 4
    return sys.getsizeof({}) + size * index + (size * 2 // 3) * 24
