"""A lean forward pass for the llama / qwen2 family, built from a loaded Hugging Face model's weights.

What it saves over the Hugging Face forward, per step:
- fused projections: one matrix product for Q, K and V, one for gate and up (3 + 2 -> 2 per layer);
- weights prepacked for oneDNN (the blocked layout its kernels want, done once at build); on a CPU
  without native bfloat16, a bfloat16 model's products run on float32 copies (see `linear_mode`);
- a preallocated KV cache, one tensor for all layers, written in place; compaction after a step is
  one gather/scatter for all layers instead of two per layer;
- a precomputed rotary table, Q and K rotated together, grouped-query attention inside
  `scaled_dot_product_attention` (no repeated K/V), and no mask machinery: the tree mask is used
  as a boolean mask directly, and dropped when every query sees every key (one row, no tree);
  one query per row in bfloat16 (every plain step) by `one_query_attention`, where torch's kernel is slow.

Logits equal the Hugging Face model's: the same operations in the same dtypes (float32 within
1e-4; bfloat16 within bfloat16 rounding), except bfloat16 one-query attention, which is no farther
from float32 than Hugging Face's bfloat16 is. tests/test_lean.py checks it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stand.errors import StandError
from stand.backends.kv import TreeBatch
from stand.backends.lean_cache import CACHE_CHUNK, LeanCache  # noqa: F401  (CACHE_CHUNK: part of this module's API)
from stand.backends.torch import Target

LEAN_ARCHS = {"llama", "qwen2"}
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}  # rope types whose table does not depend on the length


@dataclass(frozen=True)
class LeanConfig:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    eps: float
    max_len: int


# ---- building ------------------------------------------------------------------------------------

def unsupported_reason(model) -> str | None:
    """Why the lean forward cannot run this model (None: it can)."""
    cfg = model.config
    arch = getattr(cfg, "model_type", "?")
    if arch not in LEAN_ARCHS:
        return f"architecture {arch!r} (lean supports {', '.join(sorted(LEAN_ARCHS))})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "mlp_bias", False):
        return "MLP biases"
    if arch == "qwen2" and getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope type {rope!r}"
    return None


def lean_config(model) -> LeanConfig:
    cfg = model.config
    heads = cfg.num_attention_heads
    return LeanConfig(layers=cfg.num_hidden_layers, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", heads),
                      head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, hidden=cfg.hidden_size,
                      intermediate=cfg.intermediate_size, eps=float(cfg.rms_norm_eps),
                      max_len=int(getattr(cfg, "max_position_embeddings", 2048)))


LINEAR_MODES = ("auto", "dense", "packed", "fp32")


def linear_mode(dtype: torch.dtype, mode: str = "auto") -> str:
    """How matrix products run: "dense" (torch's F.linear), "packed" (weights prepacked for oneDNN in the
    model's dtype), "fp32" (a bfloat16 model's weights prepacked in float32, outputs rounded back to bfloat16:
    for CPUs without native bfloat16, where emulated bfloat16 products are several times slower; a single
    row still uses the bfloat16 weights, since reading them is the cost there).
    auto: packed where oneDNN supports the dtype, else fp32 for bfloat16, else dense."""
    if mode not in LINEAR_MODES:
        raise StandError(f"linear mode must be one of {', '.join(LINEAR_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    mkldnn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    if not mkldnn:
        return "dense"
    if dtype == torch.bfloat16:
        return "packed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "packed" if dtype == torch.float32 else "dense"


class Linear:
    """y = x W^T + b, by one of the linear modes above. x [..., K] -> [..., N] in x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str):
        self.weight, self.bias, self.out_features, self.mode = weight, bias, weight.shape[0], mode
        self.packed = None
        if mode in ("packed", "fp32"):
            w = weight.float() if mode == "fp32" else weight
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            if bias is not None and mode == "fp32":
                self.bias = bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        if self.packed is None or (self.mode == "fp32" and x2.shape[0] == 1):
            # one row reads every weight once: memory-bound, so the half-size bfloat16 weights win
            return F.linear(x, self.weight, self.bias)
        if self.mode == "fp32":
            x2 = x2.float()
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


@dataclass
class LeanLayer:
    ln1: torch.Tensor  # [hidden]
    qkv: Linear  # hidden -> (heads + 2 kv_heads) * head_dim
    o: Linear  # heads * head_dim -> hidden
    ln2: torch.Tensor  # [hidden]
    gate_up: Linear  # hidden -> 2 intermediate
    down: Linear  # intermediate -> hidden


def _fuse(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stacked weights [sum N, K] (and biases) of several nn.Linear with the same input."""
    weight = torch.cat([m.weight.detach() for m in linears], dim=0).contiguous()
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return weight, None
    bias = torch.cat([(b.detach() if b is not None else torch.zeros(m.weight.shape[0], dtype=weight.dtype))
                      for m, b in zip(linears, biases)])
    return weight, bias


def _share(linears, weight: torch.Tensor) -> None:
    """Points the Hugging Face modules' weights at rows of the fused weight, so memory is not doubled."""
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[start:start + n], requires_grad=False)
        start += n


def _bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def build_layer(hf_layer, mode: str) -> LeanLayer:
    attn, mlp = hf_layer.self_attn, hf_layer.mlp
    qkv_mods, gu_mods = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
    wqkv, bqkv = _fuse(qkv_mods)
    wgu, _ = _fuse(gu_mods)
    _share(qkv_mods, wqkv)
    _share(gu_mods, wgu)
    return LeanLayer(ln1=hf_layer.input_layernorm.weight.detach(), qkv=Linear(wqkv, bqkv, mode),
                     o=Linear(attn.o_proj.weight.detach(), _bias(attn.o_proj), mode),
                     ln2=hf_layer.post_attention_layernorm.weight.detach(),
                     gate_up=Linear(wgu, None, mode), down=Linear(mlp.down_proj.weight.detach(), None, mode))


def rope_table(rot, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] computed as the Hugging Face rotary module `rot` computes them."""
    pos = torch.arange(max_len, dtype=torch.float32)
    freqs = pos[:, None] * rot.inv_freq.float()[None, :]  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    scale = float(getattr(rot, "attention_scaling", 1.0))
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


# ---- the forward ---------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As Hugging Face: normalise in float32, cast back, then scale."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding. x [B, T, n, D]; cos, sin [B, T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LeanModel:
    """The decoder as plain tensor code over its weights: `embed` (ids -> [..., hidden]), the layers, the final
    norm and `lm_head` ([..., hidden] -> [..., V]) are callables, so the weights may be dense (from a Hugging Face
    model, `from_hf`) or 4-bit groups (backends/int4.py). Activations and the cache are in `dtype` on `device`."""

    def __init__(self, cfg: LeanConfig, embed, layers: list[LeanLayer], norm: torch.Tensor, lm_head,
                 rope: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.cfg, self.embed, self.layers, self.norm, self.lm_head = cfg, embed, layers, norm, lm_head
        self.cos, self.sin = rope
        self.dtype, self.device = dtype, torch.device(device)
        self.cache_dtype = dtype
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    @classmethod
    def from_hf(cls, model, linear: str = "auto") -> "LeanModel":
        """The lean forward over a loaded Hugging Face llama/qwen2 model's weights (shared, not copied)."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise StandError(f"the lean forward does not support this model: {reason}")
        cfg = lean_config(model)
        dtype, device = model.get_input_embeddings().weight.dtype, model.get_input_embeddings().weight.device
        mode = linear_mode(dtype, linear) if device.type == "cpu" else "dense"  # oneDNN's packing is CPU-only
        embed = functools.partial(F.embedding, weight=model.get_input_embeddings().weight.detach())  # [V, hidden]
        layers = [build_layer(layer, mode) for layer in model.model.layers]
        head = Linear(model.get_output_embeddings().weight.detach(), None, mode)
        rope = tuple(t.to(device) for t in rope_table(model.model.rotary_emb, cfg.max_len, dtype))
        lean = cls(cfg, embed, layers, model.model.norm.weight.detach(), head, rope, dtype, device)
        lean.linear = mode
        return lean

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one cached token takes in every layer (K and V in the cache's dtype): the server's memory bound."""
        c = self.cfg
        return c.layers * 2 * c.kv_heads * c.head_dim * self.cache_dtype.itemsize

    def new_cache(self) -> LeanCache:
        c = self.cfg
        return LeanCache(c.layers, c.kv_heads, c.head_dim, self.cache_dtype, self.device)

    def forward(self, cache: LeanCache, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                keep_last: int = 0) -> torch.Tensor:
        """ids, pos [B, T]; mask [B, 1, T, S + T] bool or None (all allowed) -> logits [B, T or keep_last, V]."""
        B, T = ids.shape
        S = cache.reserve(B, T)
        rope = self.rope(pos)
        x = self.embed(ids)  # [B, T, hidden]
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, x, rope, cache.layer(i), S, mask)
        cache.length = S + T
        if keep_last:
            x = x[:, -keep_last:]
        return self.lm_head(self.final_norm(x))

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos [B, T] -> the rotary tables at those positions, cos and sin [B, T, 1, D]."""
        return self.cos[pos][:, :, None], self.sin[pos][:, :, None]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.norm, self.cfg.eps)

    def _layer(self, layer: LeanLayer, x, rope, kv, S: int, mask):
        cos, sin = rope
        x = x + self._attention(layer, rms_norm(x, layer.ln1, self.cfg.eps), cos, sin, kv, S, mask)
        h = layer.gate_up(rms_norm(x, layer.ln2, self.cfg.eps))  # [B, T, 2I]
        gate, up = h.chunk(2, dim=-1)
        return x + layer.down(F.silu(gate) * up)

    def _attention(self, layer: LeanLayer, x, cos, sin, kv, S: int, mask):
        c = self.cfg
        B, T, _ = x.shape
        qkv = layer.qkv(x).view(B, T, c.heads + 2 * c.kv_heads, c.head_dim)
        qk = rotate(qkv[:, :, : c.heads + c.kv_heads], cos, sin)  # [B, T, H + Hkv, D]
        keys, values = kv  # [B, Hkv, capacity, D]
        keys[:, :, S:S + T] = qk[:, :, c.heads:].transpose(1, 2)
        values[:, :, S:S + T] = qkv[:, :, c.heads + c.kv_heads:].transpose(1, 2)
        q = qk[:, :, : c.heads].transpose(1, 2)  # [B, H, T, D]
        if T == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":  # CPU only: CUDA's SDPA is fast here
            out = one_query_attention(q, keys[:, :, : S + T], values[:, :, : S + T], mask, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, keys[:, :, : S + T], values[:, :, : S + T], attn_mask=mask,
                                                 scale=self.scale, enable_gqa=c.heads != c.kv_heads)  # [B, H, T, D]
        return layer.o(out.transpose(1, 2).reshape(B, T, c.heads * c.head_dim))


def one_query_attention(q, keys, values, mask, scale: float) -> torch.Tensor:
    """Attention of one bfloat16 query per row: q [B, H, 1, D], keys and values [B, Hkv, S, D], mask [B, 1, 1, S]
    bool or None -> [B, H, 1, D]. Scores, softmax and the weighted sum in float32 (as the fused kernel accumulates),
    rounded once. torch's CPU `scaled_dot_product_attention` is slow for this shape in bfloat16, and every plain
    decoding step has it (measured: docs/results.md#pass-shapes-on-torch)."""
    B, H, _, D = q.shape
    return grouped_attention(q.transpose(1, 2).float(), keys, values, mask, scale).view(B, 1, H, D).transpose(
        1, 2).to(q.dtype)


def grouped_attention(q, keys, values, mask, scale: float) -> torch.Tensor:
    """Attention in float32 whatever the cache's dtype, the query heads of a KV head as one product:
    q [B, T, H, D] float32, keys and values [B, Hkv, S, D], mask [B, 1, T, S] bool or None -> [B, T, H * D]."""
    B, T, H, D = q.shape
    kv_heads = keys.shape[1]
    g = H // kv_heads
    qg = q.view(B, T, kv_heads, g, D).permute(0, 2, 3, 1, 4).reshape(B, kv_heads, g * T, D)
    s = (qg * scale) @ keys.float().transpose(-1, -2)  # [B, Hkv, g T, S]
    if mask is not None:
        s = s.view(B, kv_heads, g, T, -1).masked_fill(~mask[:, :, None], float("-inf")).view(B, kv_heads, g * T, -1)
    out = s.softmax(-1) @ values.float()  # [B, Hkv, g T, D]
    return out.view(B, kv_heads, g, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)


# ---- the target ----------------------------------------------------------------------------------

@dataclass
class LeanTarget(Target):
    """A Target whose forward runs the lean model; `model` stays the Hugging Face model (same weights)."""

    lean: LeanModel | None = None

    @classmethod
    def from_target(cls, target: Target, linear: str = "auto") -> "LeanTarget":
        lean = LeanModel.from_hf(target.model, linear=linear)
        return cls(target.model, target.tokenizer, target.name, target.dtype, lean=lean)

    def inner_cache(self) -> LeanCache:
        return self.lean.new_cache()

    @torch.inference_mode()
    def forward(self, cache: LeanCache, batch: TreeBatch, all_logits: bool = True) -> torch.Tensor:
        """Writes the batch's KV after the cache's slots; returns logits [B, T, V] (or [B, 1, V]) on the CPU."""
        allowed = batch.allowed  # [B, T, S + T]
        one_token = allowed.shape[1] == 1  # a tree always masks siblings: only a single token can see all
        mask = None if one_token and bool(allowed.all()) else allowed[:, None]
        return self._run(cache, batch.input_ids, batch.position_ids, mask, 0 if all_logits else 1)

    def _run(self, cache: LeanCache, ids, pos, mask, keep_last: int) -> torch.Tensor:
        dev = self.lean.device
        if dev.type != "cpu":
            ids, pos, mask = (None if t is None else t.to(dev, non_blocking=True) for t in (ids, pos, mask))
        return self.lean.forward(cache, ids, pos, mask, keep_last=keep_last).cpu()

    @torch.inference_mode()
    def next_logits(self, contexts: list[list[int]]) -> torch.Tensor:
        """[N, V] float32 logits after each context (equal lengths), each context alone in a fresh cache."""
        ids = torch.tensor(contexts, dtype=torch.long)  # [N, L]
        N, L = ids.shape
        mask = None if L == 1 else torch.ones(L, L, dtype=torch.bool).tril().expand(N, 1, L, L)
        pos = torch.arange(L).expand(N, L)
        return self._run(self.lean.new_cache(), ids, pos, mask, 1)[:, -1].float()


def with_forward(target: Target, forward: str = "auto", linear: str = "auto") -> Target:
    """The target behind the chosen forward: lean, Hugging Face, or (auto) lean where supported."""
    if forward == "hf" or isinstance(target, LeanTarget):
        return target
    reason = unsupported_reason(target.model)
    if reason is None:
        return LeanTarget.from_target(target, linear)
    if forward == "lean":
        raise StandError(f"the lean forward does not support this model: {reason}; use forward 'hf'")
    return target
