"""The lean forward for 4-bit weights: the same decoder as lean.py with fewer, larger operations per layer.

With the matrix products at int4 cost, a pass's other operations (a few microseconds each, some sixty per
layer in the dense lean forward) cost as much as the products. This layer runs about seventeen:
- the residual stream, the norms and attention in float32, rounded to bfloat16 only where the int4 kernels read
  it: a pass of several tokens then rounds as one-token passes do far more often than with a bfloat16 residual
  (this model's residual holds values in the hundreds, where bfloat16's step is whole units), and it costs
  nothing here (a float32 norm is as fast, a mixed add one operation);
- RMS norms as one `F.rms_norm` with the weight;
- Q and K rows kept in GGUF's interleaved-pairs order (int4.py puts them there), so rotary embedding is one
  complex multiplication in float32 (a dot product does not change when both sides permute alike);
- the KV cache in float32 and attention in float32, the query heads of each KV head as one product (lean.py's
  `grouped_attention`, every pass width): the rotated keys are float32 already, so nothing is converted per
  layer. A bfloat16 cache halves the cache's memory but is converted for float32 attention at every layer, a cost
  that grows with the context (docs/results.md#torch-int4). torch's fused `scaled_dot_product_attention` is
  faster still for one query (about 1 ms a pass at 500 cached tokens) but farther from a float64 reference of the
  default model (mean logit error 0.14 against 0.06 on a masked one-token step), so it is not used;
- SiLU and the gate product in place.
docs/backends.md lists what each cut gained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stand.backends.lean import LeanConfig, LeanLayer, LeanModel, grouped_attention


def rope_cis(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF-style cos, sin tables [P, D] (each half repeated) -> complex64 [P, D/2] for rotating pairs."""
    half = cos.shape[-1] // 2
    return torch.complex(cos[:, :half].float(), sin[:, :half].float())


def pair_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that turns Q or K rows in Hugging Face's halves order into interleaved pairs: pairs row
    h*D + 2i + j is halves row h*D + j*D/2 + i."""
    dim = rows // heads
    h, i, j = torch.meshgrid(torch.arange(heads), torch.arange(dim // 2), torch.arange(2), indexing="ij")
    return (h * dim + j * (dim // 2) + i).reshape(-1)


class Int4Model(LeanModel):
    """LeanModel whose layers run the int4 recipe above; rope: (cos, sin) tables as LeanModel's, Q/K rows of
    every layer in pairs order; the residual stream and the cache in float32, the products' inputs and outputs in
    `compute` (the int4 kernels' bfloat16; float32 for exact references). embed may return either."""

    def __init__(self, cfg: LeanConfig, embed, layers: list[LeanLayer], norm, lm_head, rope,
                 compute: torch.dtype = torch.bfloat16, device="cpu"):
        super().__init__(cfg, embed, layers, norm, lm_head, rope, torch.float32, device)
        self.cis = rope_cis(self.cos, self.sin).to(self.device)  # [P, D/2]
        self.compute = compute

    def rope(self, pos: torch.Tensor) -> torch.Tensor:
        """pos [B, T] -> the rotations at those positions, complex [B, T, 1, D/2]."""
        return self.cis[pos][:, :, None]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (self.cfg.hidden,), self.norm, self.cfg.eps).to(self.compute)

    def _layer(self, layer: LeanLayer, x, cis, kv, S: int, mask):
        c = self.cfg
        x = x.float()  # the embedding's rows, in the first layer
        x = x + self._attention(layer, F.rms_norm(x, (c.hidden,), layer.ln1, c.eps), cis, kv, S, mask)
        h = layer.gate_up(F.rms_norm(x, (c.hidden,), layer.ln2, c.eps))  # [B, T, 2I]
        gate, up = h.chunk(2, dim=-1)
        return x + layer.down(F.silu(gate, inplace=True).mul_(up))

    def _attention(self, layer: LeanLayer, x, cis, kv, S: int, mask):
        c = self.cfg
        B, T, _ = x.shape
        H, D, nqk = c.heads, c.head_dim, c.heads + c.kv_heads
        qkv = layer.qkv(x)  # [B, T, (H + 2 Hkv) D]
        qk = torch.view_as_complex(qkv[..., : nqk * D].float().view(B, T, nqk, D // 2, 2))
        qk = torch.view_as_real(qk * cis).view(B, T, nqk, D)  # rotated, float32
        keys, values = kv  # [B, Hkv, capacity, D] float32
        keys[:, :, S:S + T] = qk[:, :, H:].transpose(1, 2)
        values[:, :, S:S + T] = qkv[..., nqk * D:].view(B, T, c.kv_heads, D).transpose(1, 2)
        out = grouped_attention(qk[:, :, :H], keys[:, :, : S + T], values[:, :, : S + T], mask, self.scale)
        return layer.o(out)  # [B, T, H D], rounded to `compute` by the product
