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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stand.errors import StandError
from stand.backends.kv import TreeBatch, cat_rows, path_moves
from stand.backends.torch import Target

LEAN_ARCHS = {"llama", "qwen2"}
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}  # rope types whose table does not depend on the length
CACHE_CHUNK = 256  # cache capacity grows in steps of this many slots


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


def rope_table(model, max_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] computed as the Hugging Face rotary module computes them."""
    rot = model.model.rotary_emb
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
    """The decoder as plain tensor code over weights taken from a Hugging Face llama/qwen2 model."""

    def __init__(self, model, linear: str = "auto"):
        reason = unsupported_reason(model)
        if reason is not None:
            raise StandError(f"the lean forward does not support this model: {reason}")
        self.cfg = lean_config(model)
        self.dtype = model.get_input_embeddings().weight.dtype
        self.linear = linear_mode(self.dtype, linear)
        self.embed = model.get_input_embeddings().weight.detach()  # [V, hidden]
        self.layers = [build_layer(layer, self.linear) for layer in model.model.layers]
        self.norm = model.model.norm.weight.detach()
        head = model.get_output_embeddings()
        self.lm_head = Linear(head.weight.detach(), None, self.linear)
        self.cos, self.sin = rope_table(model, self.cfg.max_len, self.dtype)
        self.scale = 1.0 / math.sqrt(self.cfg.head_dim)

    def new_cache(self) -> "LeanCache":
        c = self.cfg
        return LeanCache(c.layers, c.kv_heads, c.head_dim, self.dtype)

    def forward(self, cache: "LeanCache", ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                keep_last: int = 0) -> torch.Tensor:
        """ids, pos [B, T]; mask [B, 1, T, S + T] bool or None (all allowed) -> logits [B, T or keep_last, V]."""
        B, T = ids.shape
        S = cache.reserve(B, T)
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # [B, T, 1, D]
        x = F.embedding(ids, self.embed)  # [B, T, hidden]
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, x, cos, sin, cache.layer(i), S, mask)
        cache.length = S + T
        if keep_last:
            x = x[:, -keep_last:]
        return self.lm_head(rms_norm(x, self.norm, self.cfg.eps))

    def _layer(self, layer: LeanLayer, x, cos, sin, kv, S: int, mask):
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
        if T == 1 and q.dtype == torch.bfloat16:
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
    kv_heads = keys.shape[1]
    s = q.reshape(B, kv_heads, H // kv_heads, D).float() @ keys.float().transpose(-1, -2) * scale  # [B, Hkv, g, S]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ values.float()).reshape(B, H, 1, D).to(q.dtype)


# ---- the cache -----------------------------------------------------------------------------------

class LeanCache:
    """KV of every layer in one preallocated tensor [layers, 2, B, H_kv, capacity, D].

    Slots [0, length) are in use (row b's committed KV in [0, L_b), a masked gap after it, as in
    kv.py); capacity grows in chunks of CACHE_CHUNK slots, copying once per chunk.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.shape = (layers, 2, kv_heads, head_dim)
        self.dtype = dtype
        self.kv: torch.Tensor | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.shape[4]

    def _alloc(self, rows: int, capacity: int) -> torch.Tensor:
        layers, two, heads, dim = self.shape
        return torch.empty(layers, two, rows, heads, capacity, dim, dtype=self.dtype)

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
        rows, src, dst, new_lengths = path_moves(paths, lengths, cache_len)
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
        out = LeanCache(self.shape[0], self.shape[2], self.shape[3], self.dtype)
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
        fresh[..., :new_len, :] = self.kv[:, :, torch.tensor(keep, dtype=torch.long), :, :new_len]
        self.kv, self.length = fresh, new_len


# ---- the target ----------------------------------------------------------------------------------

@dataclass
class LeanTarget(Target):
    """A Target whose forward runs the lean model; `model` stays the Hugging Face model (same weights)."""

    lean: LeanModel | None = None

    @classmethod
    def from_target(cls, target: Target, linear: str = "auto") -> "LeanTarget":
        lean = LeanModel(target.model, linear=linear)
        return cls(target.model, target.tokenizer, target.name, target.dtype, lean=lean)

    def inner_cache(self) -> LeanCache:
        return self.lean.new_cache()

    @torch.inference_mode()
    def forward(self, cache: LeanCache, batch: TreeBatch, all_logits: bool = True) -> torch.Tensor:
        """Writes the batch's KV after the cache's slots; returns logits [B, T, V] (or [B, 1, V])."""
        allowed = batch.allowed  # [B, T, S + T]
        one_token = allowed.shape[1] == 1  # a tree always masks siblings: only a single token can see all
        mask = None if one_token and bool(allowed.all()) else allowed[:, None]
        return self.lean.forward(cache, batch.input_ids, batch.position_ids, mask, keep_last=0 if all_logits else 1)


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
