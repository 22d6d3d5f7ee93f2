"""`--dtype int4` on the torch backend: the lean forward over 4-bit weight groups (quant.py).

From a GGUF file, the weights are read straight from its blocks (gguf's reader, memory-mapped), never through
transformers' de-quantised float copy: Q4_0 and Q4_1 matrices become int4 groups as they are; a Q8_0 output head
runs as two int4 planes of its own 8-bit codes (or, by choice, per-channel int8 or bfloat16: `HEADS`); a Q8_0 or
Q4 embedding table is looked up from its codes; norms are read as floats. Only the model's skeleton (its
configuration, on the meta device, with no weights) and tokenizer come from transformers.

Layer matrices of any other type (a float or K-quant GGUF file, a Hugging Face directory) are quantised to int4
groups on load, with a warning: that is a different model from the file's, done because the user asked for
int4, never by `--dtype auto` (which offers int4 only for files whose matrices are all Q4_0/Q4_1, `exact_int4`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stand.backends.lean import LeanLayer, LeanModel, LeanTarget, Linear, lean_config, rope_table, unsupported_reason
from stand.backends.quant import GROUP, Q4_TYPES, GroupEmbedding, Groups, Int4Linear, block_groups, concat, planes, \
    quantize_groups, release_memory
from stand.backends.torch import Target, _check_arch, load_failure, load_tokenizer, quiet_transformers
from stand.errors import StandError

HEADS = ("auto", "int4x2", "int8", "bfloat16")  # how a Q8_0 output head runs (auto: int4x2, the fastest measured)
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
FLOAT_TYPES = ("F32", "F16", "BF16")
log = logging.getLogger("stand")


@dataclass(frozen=True)
class Int4Options:
    compute: torch.dtype = torch.bfloat16  # activations (float32: exact products, slow; for tests and references)
    head: str = "auto"  # a Q8_0 output head: int4x2 (its codes as two int4 planes), int8 (per channel), bfloat16
    device: str = "cpu"


# ---- a GGUF file's tensors ------------------------------------------------------------------------------

class GGUFTensors:
    """The tensors of a GGUF file by name, as Groups (4- or 8-bit blocks) or float tensors, shaped [N, K] like
    torch's weights. gguf's reader parses the file's layout; each tensor's bytes are then read from the file
    when asked for, so neither the reader's parsed metadata nor the whole file stays in memory."""

    def __init__(self, path: str):
        import gguf

        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # a truncated or foreign file
            raise StandError(f"could not read the tensors of {path}: {load_failure(e)}") from e
        self.path = path
        # name -> (type, numpy dtype, shape as stored, byte offset); the shape is innermost last, i.e. [N, K]
        self.tensors = {t.name: (t.tensor_type, t.data.dtype, tuple(t.data.shape), int(t.data_offset))
                        for t in reader.tensors}
        arch = reader.fields.get("general.architecture")
        self.arch = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else "?"
        del reader, arch
        release_memory()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def kind(self, name: str) -> str:
        return self.tensors[name][0].name

    def raw(self, name: str) -> np.ndarray:
        _, dtype, shape, offset = self.tensors[name]
        return np.fromfile(self.path, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)

    def groups(self, name: str) -> Groups:
        """Blocks as groups: exactly the file's codes (Q4_0, Q4_1, Q8_0)."""
        return block_groups(self.raw(name), self.kind(name))

    def floats(self, name: str) -> torch.Tensor:
        """The tensor's values in float32 (de-quantised by gguf for quantised types)."""
        import gguf

        kind, data = self.tensors[name][0], self.raw(name)
        if kind.name not in ("F32", "F16"):
            data = gguf.quants.dequantize(data, kind)
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's interleaving of Q and K rows for a llama file: Hugging Face row
    h*D + j*D/2 + i is the file's row h*D + 2i + j."""
    dim = rows // heads
    h, j, i = torch.meshgrid(torch.arange(heads), torch.arange(2), torch.arange(dim // 2), indexing="ij")
    return (h * dim + 2 * i + j).reshape(-1)


def layer_groups(t: GGUFTensors, i: int, cfg, requantized: Counter) -> dict[str, Groups]:
    """The seven matrices of layer i as int4 groups, Hugging Face row order; types other than Q4_0/Q4_1 are
    quantised to groups (counted in `requantized` by type)."""
    out = {}
    for m in LAYER_MATRICES:
        name = f"blk.{i}.{m}.weight"
        kind = t.kind(name)
        if kind in Q4_TYPES:
            g = t.groups(name)
        else:
            requantized[kind] += 1
            g = quantize_groups(t.floats(name))
        if t.arch == "llama" and m in ("attn_q", "attn_k"):
            g = g.rows(rotary_rows(g.shape[0], cfg.heads if m == "attn_q" else cfg.kv_heads))
        out[m] = g
    return out


def _bias(t: GGUFTensors, i: int, opts: Int4Options) -> torch.Tensor | None:
    names = [f"blk.{i}.attn_{m}.bias" for m in "qkv"]
    if not all(n in t for n in names):
        return None
    return torch.cat([t.floats(n) for n in names]).to(opts.compute).to(opts.device)


def int4_layer(groups: dict[str, Groups], ln1: torch.Tensor, ln2: torch.Tensor, bias, opts: Int4Options) -> LeanLayer:
    """One decoder layer over int4 products (fused Q/K/V and gate/up, as the dense lean layer)."""
    dev = torch.device(opts.device)
    lin = lambda g, b=None: Int4Linear(g, dev, opts.compute, bias=b)
    qkv = concat([groups["attn_q"], groups["attn_k"], groups["attn_v"]])
    return LeanLayer(ln1=ln1, qkv=lin(qkv, bias), o=lin(groups["attn_output"]), ln2=ln2,
                     gate_up=lin(concat([groups["ffn_gate"], groups["ffn_up"]])), down=lin(groups["ffn_down"]))


# ---- the embedding and the output head ------------------------------------------------------------------

def embedding_and_head(t: GGUFTensors, opts: Int4Options):
    """(ids -> rows of token_embd, [..., hidden] -> logits): the table from its codes where it is Q4/Q8 blocks
    (else dense); the head from `output.weight`, or from the table where the head is tied to it (read once)."""
    dev = torch.device(opts.device)
    table = "token_embd.weight"
    groups = t.groups(table) if t.kind(table) in (*Q4_TYPES, "Q8_0") else None
    if groups is not None:
        embed = GroupEmbedding(groups, opts.compute, dev)
    else:
        embed = functools.partial(F.embedding, weight=t.floats(table).to(opts.compute).to(dev))
    name = "output.weight" if "output.weight" in t else table
    if name != table:
        groups = t.groups(name) if t.kind(name) in (*Q4_TYPES, "Q8_0") else None
    return embed, output_head(t, name, groups, opts)


def output_head(t: GGUFTensors, name: str, groups: Groups | None, opts: Int4Options):
    """[..., hidden] -> logits from tensor `name` (groups: its blocks, None where it is not Q4/Q8)."""
    kind, dev = t.kind(name), torch.device(opts.device)
    if kind in Q4_TYPES:
        return Int4Linear(groups, dev, opts.compute)
    head = "int4x2" if opts.head == "auto" else opts.head
    if kind == "Q8_0" and head == "int4x2":
        return Int4Linear(planes(groups), dev, opts.compute, twice=True)
    if kind == "Q8_0" and head == "int8":
        return Int8Linear(groups.dequantize(), dev, opts.compute)
    return Linear(t.floats(name).to(opts.compute).to(dev), None, "dense" if dev.type != "cpu" else "auto")


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


# ---- building -------------------------------------------------------------------------------------------

def skeleton(path: str):
    """The Hugging Face model of a GGUF file without weights (meta device): its configuration, generation
    configuration and shapes, for the Target's bookkeeping. Nothing is de-quantised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    directory, name = os.path.split(os.path.abspath(path))
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except Exception as e:
        raise StandError(f"could not read the configuration of {path}: {load_failure(e)}") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    _check_arch(model)
    return model.eval()


def lean_from_gguf(path: str, model, opts: Int4Options) -> LeanModel:
    """The int4 lean forward over a GGUF file's blocks (see the module docstring); model: its skeleton."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise StandError(f"int4 runs on the lean forward, which does not support this model: {reason}")
    t, cfg = GGUFTensors(path), lean_config(model)
    dev, requantized = torch.device(opts.device), Counter()
    norm = lambda name: t.floats(name).to(opts.compute).to(dev)
    layers = []
    from tqdm.auto import tqdm

    for i in tqdm(range(cfg.layers), desc="int4 weights", unit="layer", leave=False):
        layers.append(int4_layer(layer_groups(t, i, cfg, requantized), norm(f"blk.{i}.attn_norm.weight"),
                                 norm(f"blk.{i}.ffn_norm.weight"), _bias(t, i, opts), opts))
        release_memory(collect=False)  # each layer's scratch, before the next one's
    if requantized:
        kinds = ", ".join(f"{n} {k}" for k, n in requantized.items())
        log.warning("int4: %s layer matrices of %s (%s) are not 4-bit blocks and were quantised to int4 groups on "
                    "load: a different model from the file's", sum(requantized.values()), os.path.basename(path), kinds)
    rot = type(model.model.rotary_emb)(config=model.config)  # the skeleton's is on the meta device
    embed, head = embedding_and_head(t, opts)
    return LeanModel(cfg, embed, layers, norm("output_norm.weight"), head,
                     tuple(x.to(dev) for x in rope_table(rot, cfg.max_len, opts.compute)), opts.compute, dev)


def lean_from_hf(model, opts: Int4Options) -> LeanModel:
    """A Hugging Face model's layer matrices quantised to int4 groups (a different model); the embedding and
    the output head stay dense in the compute dtype."""
    dense = LeanModel.from_hf(model, linear="dense")
    dev = torch.device(opts.device)
    for layer, hf in zip(dense.layers, model.model.layers):
        q = lambda lin: quantize_groups(lin.weight)
        layer.qkv = Int4Linear(q(layer.qkv), dev, opts.compute, bias=layer.qkv.bias)
        layer.o, layer.down = (Int4Linear(q(lin), dev, opts.compute) for lin in (layer.o, layer.down))
        layer.gate_up = Int4Linear(q(layer.gate_up), dev, opts.compute)
        layer.ln1, layer.ln2 = (w.to(opts.compute).to(dev) for w in (layer.ln1, layer.ln2))
    embed = model.get_input_embeddings().weight.detach().to(opts.compute).to(dev)
    head = model.get_output_embeddings().weight.detach().to(opts.compute).to(dev)
    return LeanModel(dense.cfg, functools.partial(F.embedding, weight=embed), dense.layers,
                     dense.norm.to(opts.compute).to(dev), Linear(head, None, "dense"),
                     tuple(x.to(opts.compute).to(dev) for x in (dense.cos, dense.sin)), opts.compute, dev)


# ---- the target -----------------------------------------------------------------------------------------

@dataclass
class Int4Target(LeanTarget):
    """The int4 lean forward as a torch Target. `model` is the Hugging Face skeleton on the meta device (the
    configuration the bookkeeping reads; no weights, so transformers' own forward and generate cannot run)."""

    source: str = ""  # what the weights were built from (a path), for the fingerprint

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}|{self.vocab_size}|int4|{self.source}".encode())
        first = self.lean.layers[0]
        for t in (first.qkv.packed, first.qkv.scales_zeros, first.down.packed):
            h.update(t.flatten()[:4096].cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


def exact_int4(path: str) -> bool:
    """Whether every layer matrix of the model at `path` is Q4_0/Q4_1 blocks (int4 is then the file's own
    weights, so `--dtype auto` may choose it)."""
    if not os.path.isfile(path):
        return False
    t = GGUFTensors(path)
    mats = [n for n in t.tensors if n.startswith("blk.") and n.split(".")[2] in LAYER_MATRICES]
    return bool(mats) and all(t.kind(n) in Q4_TYPES for n in mats)


def load_int4(path: str, opts: Int4Options = Int4Options()) -> Int4Target:
    """The model at `path` (a GGUF file or a Hugging Face directory) as an int4 Target."""
    if opts.head not in HEADS:
        raise StandError(f"head must be one of {', '.join(HEADS)}, got {opts.head!r}")
    name = os.path.basename(path.rstrip("/"))
    if os.path.isfile(path):
        model, tokenizer = skeleton(path), load_tokenizer(path)
        release_memory()  # the metadata parsed twice on the way: before the weights, not beside them
        lean = lean_from_gguf(path, model, opts)
        release_memory()
    else:
        from stand.backends.torch import load_hf

        log.warning("int4: %s is a Hugging Face directory; its layer matrices are quantised to int4 groups on load: "
                    "a different model from the directory's", name)
        hf = load_hf.__wrapped__(path, torch.float32)
        lean, model, tokenizer = lean_from_hf(hf.model, opts), hf.model.to("meta"), hf.tokenizer
    return Int4Target(model, tokenizer, name, "int4", lean=lean, source=os.path.abspath(path))
