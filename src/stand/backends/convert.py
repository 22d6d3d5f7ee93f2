"""`stand convert MODEL.gguf OUTDIR`: a Hugging Face model directory from a GGUF file, for engines that do not read
GGUF (vLLM) and for anyone else. `stand convert MODEL.gguf OUT.gguf --to bf16` (or f16, q8_0, f32): the GGUF file
re-encoded by llama.cpp's own quantizer, because what a llama.cpp pass of several tokens costs depends on the weight
type: where extra tokens of a pass cost nearly a whole step, no draft pays (measured by weight type:
docs/results.md#llamacpp-pass-cost-by-weight-type).

transformers reads the GGUF file and de-quantises its weights to float32 (the exact values the quantised weights
stand for); the model is saved with its configuration, generation configuration and tokenizer (with the chat
template the file carries). A model de-quantised on load may still say it is quantised (a quantizer object or a
quantization_config in its configuration, depending on the transformers release), which save_pretrained refuses
or writes into config.json: both are cleared first, since the weights saved are plain floats.
"""

from __future__ import annotations

import ctypes
import os

import torch

from stand.errors import StandError


def check_outdir(outdir: str) -> str:
    """OUTDIR may be absent or an empty directory; anything else is refused (nothing is overwritten)."""
    if os.path.exists(outdir) and (not os.path.isdir(outdir) or os.listdir(outdir)):
        what = "a directory that is not empty" if os.path.isdir(outdir) else "a file"
        raise StandError(f"output directory {outdir} is {what}; give a new or empty directory")
    parent = os.path.dirname(os.path.abspath(outdir))
    if os.path.exists(parent) and not os.access(parent, os.W_OK):
        raise StandError(f"cannot create {outdir}: {parent} is not writable")
    return outdir


def check_gguf(path: str) -> str:
    if not os.path.isfile(path):
        raise StandError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise StandError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    return path


def plain_weights(model) -> None:
    """Clears what marks a de-quantised model as quantised, so save_pretrained writes plain float weights."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def convert_gguf(gguf: str, outdir: str) -> str:
    """Writes the GGUF model as a Hugging Face directory (float32 weights, tokenizer); returns outdir."""
    from stand.backends.torch import load_hf

    check_outdir(outdir)
    target = load_hf(os.path.abspath(check_gguf(gguf)), torch.float32)
    model = target.model
    plain_weights(model)
    os.makedirs(outdir, exist_ok=True)
    try:
        model.save_pretrained(outdir)
        target.tokenizer.save_pretrained(outdir)
    except OSError as e:
        raise StandError(f"cannot write {outdir}: {e}") from e
    return outdir


GGUF_TYPES = {"f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
              "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}  # --to -> llama.h's llama_ftype


def requantize_gguf(gguf: str, out: str, to: str) -> str:
    """Writes `gguf` re-encoded as `to` (llama.cpp de-quantises each weight to float and encodes it again: f32
    keeps the exact values quantised weights stand for; bf16, f16 and q8_0 round them); returns out."""
    from stand.backends.llamacpp import _lib, _quiet, threads

    check_gguf(gguf)
    if os.path.exists(out):
        raise StandError(f"{out} exists; give a new file name (nothing is overwritten)")
    ll = _lib()
    _quiet()
    params = ll.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = getattr(ll, GGUF_TYPES[to]), True, threads()
    part = out + ".part"
    try:
        failed = ll.llama_model_quantize(gguf.encode(), part.encode(), ctypes.byref(params))
        if failed or not os.path.isfile(part):
            raise StandError(f"llama.cpp could not re-encode {gguf} as {to} (code {failed})")
        os.replace(part, out)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return out


def convert(gguf: str, out: str, to: str = "hf") -> str:
    """`stand convert`: a Hugging Face directory (to="hf") or a GGUF file of another weight type."""
    if to == "hf":
        return convert_gguf(gguf, out)
    if to not in GGUF_TYPES:
        raise StandError(f"unknown --to {to!r}; choose hf or one of {', '.join(GGUF_TYPES)}")
    return requantize_gguf(gguf, out, to)
