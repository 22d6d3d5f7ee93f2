"""`--dtype int4` on the torch backend: the lean forward over 4-bit weight groups (quant.py).

From a GGUF file, the weights are read straight from its blocks (gguf's reader for the layout), never through
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

from stand.backends.int4_model import Int4Model, pair_rows
from stand.backends.lean import LeanLayer, LeanModel, LeanTarget, Linear, lean_config, rope_table, unsupported_reason
from stand.backends.quant import Q4_TYPES, GroupEmbedding, Groups, Int4Linear, Int8Linear, block_groups, concat, \
    planes, quantize_groups, release_memory
from stand.backends.torch import Target, _check_arch, load_failure, load_tokenizer, quiet_transformers
from stand.errors import StandError

HEADS = ("auto", "int4x2", "int8", "bfloat16")  # how a Q8_0 output head runs (see output_head)
HEAD_ROWS = 8  # auto: from this many rows a pass's Q8_0 head runs in bfloat16 (the int4 kernel's cost grows per 4 rows)
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
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
            raise StandError(f"could not load the tensors of {path}: {load_failure(e)}") from e
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


def layer_groups(t: GGUFTensors, i: int, cfg, requantized: Counter) -> dict[str, Groups]:
    """The seven matrices of layer i as int4 groups, Q and K rows in interleaved pairs (int4_model.py): as a
    llama file has them, re-ordered for others. Types other than Q4_0/Q4_1 are quantised to groups (counted in
    `requantized` by type)."""
    out = {}
    for m in LAYER_MATRICES:
        name = f"blk.{i}.{m}.weight"
        kind = t.kind(name)
        if kind in Q4_TYPES:
            g = t.groups(name)
        else:
            requantized[kind] += 1
            g = quantize_groups(t.floats(name))
        if t.arch != "llama" and m in ("attn_q", "attn_k"):
            g = g.rows(pair_rows(g.shape[0], cfg.heads if m == "attn_q" else cfg.kv_heads))
        out[m] = g
    return out


def _bias(t: GGUFTensors, i: int, cfg, opts: Int4Options) -> torch.Tensor | None:
    """Layer i's Q, K and V biases (qwen2) as one vector, Q and K in pairs order like their rows."""
    names = [f"blk.{i}.attn_{m}.bias" for m in "qkv"]
    if not all(n in t for n in names):
        return None
    q, k, v = (t.floats(n) for n in names)
    if t.arch != "llama":
        q, k = q[pair_rows(len(q), cfg.heads)], k[pair_rows(len(k), cfg.kv_heads)]
    return torch.cat([q, k, v]).to(opts.compute).to(opts.device)


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
        embed = GroupEmbedding(groups, torch.float32, dev)  # exact rows, into the float32 residual
    else:
        embed = functools.partial(F.embedding, weight=t.floats(table).to(opts.compute).to(dev))
    name = "output.weight" if "output.weight" in t else table
    if name != table:
        groups = t.groups(name) if t.kind(name) in (*Q4_TYPES, "Q8_0") else None
    return embed, output_head(t, name, groups, opts)


def output_head(t: GGUFTensors, name: str, groups: Groups | None, opts: Int4Options):
    """[..., hidden] -> logits from tensor `name` (groups: its blocks, None where it is not Q4/Q8). A Q8_0 head
    runs as `opts.head` says: int4x2 (its codes as two int4 planes: as fast as int8 for few rows, and exact in
    the codes), int8 (re-quantised per output row: an error ~5x int4x2's), bfloat16 (the de-quantised weights
    rounded: faster from about 8 rows), or auto: int4x2 below HEAD_ROWS rows, bfloat16 from there."""
    kind, dev = t.kind(name), torch.device(opts.device)
    if kind in Q4_TYPES:
        return Int4Linear(groups, dev, opts.compute)
    dense = lambda: Linear((groups.dequantize(opts.compute) if groups is not None else
                            t.floats(name).to(opts.compute)).to(dev), None, "dense")
    if kind != "Q8_0" or opts.head == "bfloat16":
        return dense()
    if opts.head == "int8":
        return Int8Linear(groups.dequantize(), dev, opts.compute)
    int4x2 = Int4Linear(planes(groups), dev, opts.compute, twice=True)
    return int4x2 if opts.head == "int4x2" else RowSwitch(int4x2, dense(), HEAD_ROWS)


@dataclass
class RowSwitch:
    """`few` for passes of fewer than `rows` rows, `many` from there (two forms of the same weights)."""

    few: object
    many: object
    rows: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.few if x.numel() < self.rows * x.shape[-1] else self.many)(x)


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
    norm = lambda name: t.floats(name).to(dev)  # float32, as the residual stream
    layers = []
    from tqdm.auto import tqdm

    for i in tqdm(range(cfg.layers), desc="int4 weights", unit="layer", leave=False):
        layers.append(int4_layer(layer_groups(t, i, cfg, requantized), norm(f"blk.{i}.attn_norm.weight"),
                                 norm(f"blk.{i}.ffn_norm.weight"), _bias(t, i, cfg, opts), opts))
        release_memory(collect=False)  # each layer's scratch, before the next one's
    if requantized:
        kinds = ", ".join(f"{n} {k}" for k, n in requantized.items())
        log.warning("int4: %s layer matrices of %s (%s) are not 4-bit blocks and were quantised to int4 groups on "
                    "load: a different model from the file's", sum(requantized.values()), os.path.basename(path), kinds)
    rot = type(model.model.rotary_emb)(config=model.config)  # the skeleton's is on the meta device
    embed, head = embedding_and_head(t, opts)
    return Int4Model(cfg, embed, layers, norm("output_norm.weight"), head,
                     tuple(x.to(dev) for x in rope_table(rot, cfg.max_len, torch.float32)), opts.compute, dev)


def lean_from_hf(model, opts: Int4Options) -> LeanModel:
    """A Hugging Face model's layer matrices quantised to int4 groups (a different model); the embedding and
    the output head stay dense in the compute dtype."""
    dense, dev = LeanModel.from_hf(model, linear="dense"), torch.device(opts.device)
    c = dense.cfg
    qk_rows = torch.cat([pair_rows(c.heads * c.head_dim, c.heads),
                         c.heads * c.head_dim + pair_rows(c.kv_heads * c.head_dim, c.kv_heads),
                         torch.arange((c.heads + c.kv_heads) * c.head_dim, (c.heads + 2 * c.kv_heads) * c.head_dim)])
    int4 = lambda w, bias=None: Int4Linear(quantize_groups(w), dev, opts.compute, bias=bias)
    layers = [LeanLayer(ln1=layer.ln1.float().to(dev), ln2=layer.ln2.float().to(dev),
                        qkv=int4(layer.qkv.weight[qk_rows], None if layer.qkv.bias is None else layer.qkv.bias[qk_rows]),
                        o=int4(layer.o.weight), gate_up=int4(layer.gate_up.weight), down=int4(layer.down.weight))
              for layer in dense.layers]
    embed = model.get_input_embeddings().weight.detach().to(opts.compute).to(dev)
    head = model.get_output_embeddings().weight.detach().to(opts.compute).to(dev)
    rope = tuple(t.to(dev) for t in rope_table(model.model.rotary_emb, c.max_len, torch.float32))
    return Int4Model(c, functools.partial(F.embedding, weight=embed), layers, dense.norm.float().to(dev),
                     Linear(head, None, "dense"), rope, opts.compute, dev)


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
    try:
        t = GGUFTensors(path)
    except StandError:  # an unreadable file: the candidates that load it say why
        return False
    mats = [n for n in t.tensors if n.startswith("blk.") and n.split(".")[2] in LAYER_MATRICES]
    return bool(mats) and all(t.kind(n) in Q4_TYPES for n in mats)


def load_int4(path: str, opts: Int4Options = Int4Options(), tokenizer=None) -> Int4Target:
    """The model at `path` (a GGUF file or a Hugging Face directory) as an int4 Target; tokenizer: the file's
    (None) or one given (tests' files carry a vocabulary transformers cannot rebuild)."""
    if opts.head not in HEADS:
        raise StandError(f"head must be one of {', '.join(HEADS)}, got {opts.head!r}")
    name = os.path.basename(path.rstrip("/"))
    if os.path.isfile(path):
        model, tokenizer = skeleton(path), tokenizer or load_tokenizer(path)
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
