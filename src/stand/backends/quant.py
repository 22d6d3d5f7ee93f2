"""4-bit weights for the lean forward: a GGUF file's own quantised blocks as torch int4 groups, and the matrix
product and embedding lookup over them.

A group is 32 consecutive weights of a row sharing one scale and one zero: w = (q - 8) * scale + zero, q in
0..15, which is torch's weight-only int4 layout (`aten._weight_int4pack_mm_for_cpu` on a CPU,
`aten._weight_int4pack_mm` on CUDA). GGUF blocks are 32 weights too, so they map onto groups without
re-quantising:
- Q4_0 (scale d, w = d * (q - 8)): scale d, zero 0;
- Q4_1 (scale d, minimum m, w = d * q + m): scale d, zero m + 8d;
- Q8_0 (scale d, w = d * c, c in -128..127): c = 16 h + l with h = c >> 4 in -8..7 and l = c & 15, so the row is
  two int4 planes over the same input, h with scale 16d and zero 0, l with scale d and zero 8d; the product
  runs as one int4 product over [x, x] (K doubled): the file's own 8-bit codes, not a re-quantisation.
The kernels keep scales and zeros in bfloat16 (the file's float16 scales lose 3 bits; zero = m + 8d is
rounded once): the one departure from the file's weights besides bfloat16 activations (docs/backends.md).
Weights of any other type are quantised to groups here (`quantize_groups`, the minimum and maximum of each
group) only when a caller asks for it: a different model, never done silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stand.errors import StandError

GROUP = 32  # weights per group (and per GGUF block of the types read here)
Q4_TYPES = ("Q4_0", "Q4_1")
INNER_K_TILES = 2  # the int4 packing's K tiling (CUDA: 2, 4 or 8; the CPU kernel accepts it and ignores it)


@dataclass
class Groups:
    """Weights [N, K] as codes with a scale and a zero per group of GROUP: w = (codes - offset) * scales + zeros.
    offset 8 for 4-bit codes (0..15), 0 for signed 8-bit codes."""

    codes: torch.Tensor  # [N, K] uint8 (4-bit) or int8 (8-bit)
    scales: torch.Tensor  # [N, K / GROUP] float32
    zeros: torch.Tensor  # [N, K / GROUP] float32
    offset: int = 8

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, chunk: int = 4096) -> torch.Tensor:
        """The weights [N, K] the groups stand for, computed in float64 and rounded once to dtype (`chunk` rows
        at a time: an output head in float64 at once would take 8 bytes a weight)."""
        N, K = self.shape
        out = torch.empty(N, K, dtype=dtype)
        for lo in range(0, N, chunk):
            q = (self.codes[lo:lo + chunk].double() - self.offset).unflatten(1, (K // GROUP, GROUP))
            w = q * self.scales[lo:lo + chunk].double()[..., None] + self.zeros[lo:lo + chunk].double()[..., None]
            out[lo:lo + chunk] = w.flatten(1)
        return out

    def rows(self, index: torch.Tensor) -> "Groups":
        """The groups of rows `index` (a permutation or a subset), in that order."""
        return Groups(self.codes[index], self.scales[index], self.zeros[index], self.offset)


# ---- reading GGUF blocks -------------------------------------------------------------------------------

def _halves(raw: np.ndarray, at: int) -> torch.Tensor:
    """The float16 at byte `at` of every block, as float32. raw [N, blocks, bytes] uint8 -> [N, blocks]."""
    return torch.from_numpy(np.ascontiguousarray(raw[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """A block's 16 bytes of 4-bit codes -> its 32 codes: the low nibbles are weights 0..15, the high 16..31.
    qs [N, blocks, 16] uint8 -> [N, blocks * 32] uint8."""
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, blocks, 32]
    return torch.from_numpy(np.ascontiguousarray(codes).reshape(qs.shape[0], -1))


def block_groups(raw: np.ndarray, kind: str) -> Groups:
    """A GGUF tensor's blocks (raw [N, bytes per row] uint8, as gguf's reader gives them) as Groups [N, K]."""
    sizes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
    if kind not in sizes:
        raise StandError(f"no 4- or 8-bit block reader for GGUF type {kind}")
    N = raw.shape[0]
    blocks = raw.reshape(N, -1, sizes[kind])  # [N, K / 32, bytes]
    d = _halves(blocks, 0)
    if kind == "Q4_0":
        return Groups(_nibbles(blocks[..., 2:18]), d, torch.zeros_like(d))
    if kind == "Q4_1":
        return Groups(_nibbles(blocks[..., 4:20]), d, _halves(blocks, 2) + 8 * d)
    codes = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:34]).view(np.int8).reshape(N, -1))
    return Groups(codes, d, torch.zeros_like(d), offset=0)


def quantize_groups(w: torch.Tensor) -> Groups:
    """Float weights [N, K] rounded to 4-bit groups (a different model: only on request): each group's minimum
    and maximum span the 16 codes."""
    N, K = w.shape
    if K % GROUP:
        raise StandError(f"int4 groups need a row length that is a multiple of {GROUP}, got {K}")
    g = w.detach().float().view(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).view(N, K)
    return Groups(codes, scale, lo + 8 * scale)


def planes(groups: Groups) -> Groups:
    """Signed 8-bit groups [N, K] as 4-bit groups [N, 2K]: the high nibbles (scale 16 d) then the low (scale d,
    zero 8 d); x @ w.T equals [x, x] @ planes.T exactly in the codes."""
    if groups.offset != 0:
        raise StandError("planes() takes signed 8-bit codes")
    c, K = groups.codes, groups.codes.shape[1]  # int8; c = 16 (high - 8) + low
    codes = torch.empty(c.shape[0], 2 * K, dtype=torch.uint8)
    torch.add(c >> 4, 8, out=codes[:, :K].view(torch.int8))
    torch.bitwise_and(c, 15, out=codes[:, K:].view(torch.int8))
    d = groups.scales
    return Groups(codes, torch.cat([16 * d, d], 1), torch.cat([torch.zeros_like(d), 8 * d], 1))


def concat(parts: list[Groups]) -> Groups:
    """Groups stacked along N (fused projections: one product for several matrices of the same input)."""
    if len({p.offset for p in parts}) != 1:
        raise StandError("cannot fuse groups of different code widths")
    cat = lambda name: torch.cat([getattr(p, name) for p in parts], dim=0)
    return Groups(cat("codes"), cat("scales"), cat("zeros"), parts[0].offset)


# ---- the product ---------------------------------------------------------------------------------------

def int4_kernel(device: torch.device) -> str:
    """The int4 product for a device: the CPU kernel ("cpu") or CUDA's ("cuda")."""
    return "cuda" if device.type == "cuda" else "cpu"


def pack(codes: torch.Tensor, kernel: str, device: torch.device, chunk: int = 2048) -> torch.Tensor:
    """4-bit codes [N, K] (N a multiple of 64) in the int4 kernel's packed layout, `chunk` rows at a time (the
    packing wants int32 codes: a whole output head at once would take 4 bytes a weight)."""
    parts = []
    for lo in range(0, codes.shape[0], chunk):
        c = codes[lo:lo + chunk]
        if kernel == "cuda":  # [n, K / 2] uint8, even k in the high nibble
            parts.append(torch.ops.aten._convert_weight_to_int4pack((c[:, ::2] << 4 | c[:, 1::2]).to(device),
                                                                     INNER_K_TILES))
        else:  # rows pack in blocks of 64, so chunks of whole blocks concatenate
            parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), INNER_K_TILES))
        release_memory(collect=False)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def release_memory(collect: bool = True) -> None:
    """Hands memory freed by Python and torch back to the system: glibc keeps freed heap memory (and raises its
    threshold for mapping big blocks on its own), so the scratch of loading one tensor would otherwise add to
    the peak of everything loaded after it."""
    import ctypes
    import ctypes.util
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Int4Linear:
    """y = x W^T for W given as 4-bit Groups, by torch's int4 kernel for the device; x [..., K] -> [..., N], in
    `compute` whatever x's dtype.

    compute: the activations' dtype. bfloat16 is the fast path (the CPU kernel's vectorised code; the only one
    CUDA has); float32 keeps scales and zeros in float32 too, so the product is exact up to float32 rounding
    (the CPU kernel's scalar code: much slower, for tests and references). N is padded to a multiple of 64
    (the CPU kernel's block) with zero weights, and the padding is dropped from the output.
    twice: the input is used twice ([x, x], for planes()); bias: added to the output."""

    def __init__(self, groups: Groups, device: torch.device, compute: torch.dtype = torch.bfloat16,
                 twice: bool = False, bias: torch.Tensor | None = None):
        if groups.offset != 8:
            raise StandError("Int4Linear takes 4-bit groups (see planes() for 8-bit codes)")
        N, K = groups.shape
        if K % (GROUP * INNER_K_TILES):
            raise StandError(f"int4 groups need a row length that is a multiple of {GROUP * INNER_K_TILES}, got {K}")
        self.out_features, self.in_features, self.twice = N, K, twice
        self.compute, self.kernel = compute, int4_kernel(device)
        self.bias = None if bias is None else bias.to(compute).to(device)
        if self.kernel == "cuda" and compute != torch.bfloat16:
            raise StandError("the CUDA int4 kernel computes in bfloat16 only")
        pad = -N % 64
        if pad:  # padded rows: codes 0, scale 0, zero 0
            groups = Groups(*(F.pad(t, (0, 0, 0, pad)) for t in (groups.codes, groups.scales, groups.zeros)))
        sz = torch.stack([groups.scales.t(), groups.zeros.t()], dim=-1)  # [K / 32, N, 2]
        self.scales_zeros = sz.to(compute).contiguous().to(device)
        self.packed = pack(groups.codes, self.kernel, device)
        self.mm = torch.ops.aten._weight_int4pack_mm if self.kernel == "cuda" else \
            torch.ops.aten._weight_int4pack_mm_for_cpu

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        if x2.dtype != self.compute:
            x2 = x2.to(self.compute)
        if self.twice:
            x2 = torch.cat([x2, x2], dim=1)  # [M, 2K]
        elif not x2.is_contiguous():
            x2 = x2.contiguous()
        y = self.mm(x2, self.packed, GROUP, self.scales_zeros)  # [M, N padded]
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class GroupEmbedding:
    """An embedding table kept as Groups (a GGUF file's Q4 or Q8 blocks): a lookup de-quantises the rows it
    reads, exactly (float32), then rounds them once to `dtype`."""

    def __init__(self, groups: Groups, dtype: torch.dtype, device: torch.device):
        self.groups = Groups(*(t.to(device) for t in (groups.codes, groups.scales, groups.zeros)), groups.offset)
        self.dtype = dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., K]."""
        g = self.groups
        K = g.codes.shape[1]
        q = (g.codes[ids].float() - g.offset).unflatten(-1, (K // GROUP, GROUP))  # [..., K / 32, 32]
        return (q * g.scales[ids][..., None] + g.zeros[ids][..., None]).flatten(-2).to(self.dtype)


class Int8Linear:
    """y = x W^T with W re-quantised to int8 with one scale per output row (`aten._weight_int8pack_mm`): a Q8_0
    head's 32-weight blocks do not map onto it exactly (docs/backends.md measures the error)."""

    def __init__(self, w: torch.Tensor, device: torch.device, compute: torch.dtype):
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [N]
        self.codes = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).to(device)  # [N, K]
        self.scales, self.compute, self.out_features = scale.to(compute).to(device), compute, w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(self.compute)
        return torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scales).view(*x.shape[:-1], self.out_features)
