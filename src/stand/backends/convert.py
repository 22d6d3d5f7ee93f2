"""`stand convert MODEL.gguf OUTDIR`: a Hugging Face model directory from a GGUF file, for engines that do not read
GGUF (vLLM) and for anyone else.

transformers reads the GGUF file and de-quantises its weights to float32 (the exact values the quantised weights
stand for); the model is saved with its configuration, generation configuration and tokenizer (with the chat
template the file carries). A model de-quantised on load may still say it is quantised (a quantizer object or a
quantization_config in its configuration, depending on the transformers release), which save_pretrained refuses
or writes into config.json: both are cleared first, since the weights saved are plain floats.
"""

from __future__ import annotations

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
