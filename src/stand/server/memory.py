"""The worst-case memory of one request, from the server's limits and the model's shape.

A request may hold at most max_n rows, a prompt of max_prompt_tokens and max_tokens_limit new tokens per row.
Its memory is
- KV: on llama.cpp the samples of a prompt share its cells (prompt + n x new tokens); on torch every row holds
  the prompt and rows are padded to the longest (n x (prompt + new));
- prompt distributions: drafters that learn from the prompt (stand, recycle, consensus) keep the top k of the
  model's distribution after every prompt token, per row (16 k + 8 bytes a position); while the prompt is
  prefilled, PREFILL_CHUNK positions of full distributions at a time, CHUNK_COPIES times over (the backend's
  logits and the sampler's temporaries);
- pass logits: logits and probabilities of its rows' trees (rows + step tokens) in one pass;
- tables: one full n-gram table per prompt (none with a shared table).
`stand serve --help` shows the figure for the default model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from stand.backends.protocol import PREFILL_CHUNK

CHUNK_COPIES = 4
STEP_TOKENS = 64  # SpecConfig.step_tokens: tree tokens of one pass over all rows
KV_MARGIN = 512  # llama.cpp cells kept free for the trees of a pass


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


# SmolLM2-135M-Instruct on llama.cpp (30 layers x 3 KV heads x 64 dims x K,V x f16) with the stand drafter's
# default table (2^18 slots); tests/test_server_limits.py checks these against the loaded model.
DEFAULT_SHAPE = ModelShape("SmolLM2-135M-Instruct (llama.cpp)", 23040, 49152, 8192, True, 16384 - KV_MARGIN,
                           63_963_256, 10)


@dataclass
class WorstCase:
    kv_tokens: int
    kv: int
    prompt_probs: int
    pass_logits: int
    tables: int

    @property
    def total(self) -> int:
        return self.kv + self.prompt_probs + self.pass_logits + self.tables

    def line(self) -> str:
        return (f"{mib(self.total)} (KV {mib(self.kv)} for {self.kv_tokens:,} tokens, prompt distributions "
                f"{mib(self.prompt_probs)}, pass logits {mib(self.pass_logits)}, drafter tables {mib(self.tables)})")


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def kv_tokens(prompt_lens: list[int], rows_per_prompt: int, new_tokens: int, shape: ModelShape) -> int:
    """KV tokens a request holds at its end: prompts plus every row's new tokens (bounded by the context)."""
    total = 0
    for p in prompt_lens:
        new = max(min(new_tokens, shape.max_len - p), 0)
        total += p + rows_per_prompt * new if shape.prompt_shared else rows_per_prompt * (p + new)
    return total


def worst_case(max_n: int, max_prompt_tokens: int, max_tokens: int, shape: ModelShape,
               shared_table: bool = False) -> WorstCase:
    """The most memory one request within the limits can take (max_n rows of one prompt, or max_n prompts)."""
    prompt = min(max_prompt_tokens, shape.max_len - 1)
    tokens = max(kv_tokens([prompt], max_n, max_tokens, shape), kv_tokens([prompt] * max_n, 1, max_tokens, shape))
    if shape.capacity is not None:
        tokens = min(tokens, shape.capacity)  # a request that needs more is refused
    probs = 0
    if shape.prompt_topk:
        chunk = CHUNK_COPIES * min(PREFILL_CHUNK, prompt) * shape.vocab_size * 4
        probs = chunk + max_n * prompt * (16 * shape.prompt_topk + 8)
    passes = 2 * (max_n + STEP_TOKENS) * shape.vocab_size * 4
    tables = 0 if shared_table else max_n * shape.table_bytes
    return WorstCase(tokens, tokens * shape.kv_bytes_per_token, probs, passes, tables)


def describe(config, shape: ModelShape = DEFAULT_SHAPE) -> str:
    """One line: the worst case of a request under `config` (a ServerConfig) on a model of `shape`."""
    worst = worst_case(config.max_n, config.max_prompt_tokens, config.max_tokens_limit, shape, config.shared_table)
    cap = f"; the KV cache holds {shape.capacity:,} tokens for all requests" if shape.capacity else ""
    return (f"worst case per request on {shape.name} (n={config.max_n}, prompt {config.max_prompt_tokens:,}, "
            f"max_tokens {config.max_tokens_limit:,}): {worst.line()}{cap}")


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
    return ModelShape(f"{target.name} ({target.kind})", _llama_kv_bytes(target) if llama else _torch_kv_bytes(target),
                      target.vocab_size, target.max_len, llama, capacity, table_bytes(drafter),
                      min(drafter.prompt_topk(), target.vocab_size))


def _llama_kv_bytes(target) -> int:
    import llama_cpp as ll

    layers, heads = ll.llama_model_n_layer(target.model), ll.llama_model_n_head(target.model)
    head_dim = ll.llama_model_n_embd(target.model) // heads
    return layers * 2 * ll.llama_model_n_head_kv(target.model) * head_dim * 2  # K and V in f16


def _torch_kv_bytes(target) -> int:
    cfg = target.model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    size = next(target.model.parameters()).element_size()
    return cfg.num_hidden_layers * 2 * kv_heads * head_dim * size


def table_bytes(drafter) -> int:
    """A full n-gram table of the drafter's options (0 for drafters without one): the table's own accounting
    with every slot indexed, plus the index dict's slots."""
    o = getattr(drafter, "options", None)
    if not hasattr(drafter, "save_table") or not all(hasattr(o, k) for k in ("max_n", "topk", "capacity")):
        return 0
    from stand.drafters.ngram_table import NGramTable

    empty = NGramTable(o.max_n, o.topk, o.capacity).memory_bytes()
    return empty + o.capacity * (56 + 8 * o.max_n) + _dict_bytes(o.capacity)


def _dict_bytes(entries: int) -> int:
    """sys.getsizeof of a dict of `entries` keys, without building it: a table of the next power of two of
    3/2 x entries, with 1-, 2- or 4-byte indices and 24-byte entries for two thirds of it."""
    size = 8
    while size * 2 < entries * 3:
        size *= 2
    index = 1 if size <= 128 else 2 if size <= 1 << 15 else 4
    return sys.getsizeof({}) + size * index + (size * 2 // 3) * 24
