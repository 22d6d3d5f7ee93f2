"""Where vLLM is and how stand starts it: the interpreter that has vLLM, its environment, the speculative config of
every vLLM method stand knows, the Hugging Face directory vLLM reads, and the `vllm serve` command line.

vLLM pins other releases of numpy, transformers and fastapi than stand, so scripts/setup-vllm.sh installs it into
a virtual environment of its own (.venv-vllm, which sees the main environment's torch and has stand installed
editable); stand runs vLLM as a subprocess of that interpreter. Nothing here imports vLLM.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import sys

from stand.core.files import cache_dir
from stand.errors import StandError
from stand.integrations.vllm import PROPOSERS
from stand.methods import METHODS as ALL_METHODS, check_method

VENV = ".venv-vllm"
DEFAULT_K = 5  # num_speculative_tokens of every vLLM method (the longest chain a step verifies)
# bench and CLI names (stand/methods.py) -> stand's proposer method (custom_class) or vLLM's own
METHODS = {name: m.target for name, m in ALL_METHODS.items() if m.engine == "vllm"}
ENV = {
    "NUMBA_THREADING_LAYER": "workqueue",  # vLLM's n-gram proposer otherwise leaves torch one thread
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache per engine on CPU (vLLM's default takes a share of memory)
    "TOKENIZERS_PARALLELISM": "false",
}


def vllm_python() -> str:
    """$STAND_VLLM_PYTHON, else this interpreter if it has vLLM, else .venv-vllm/bin/python in the working
    directory or in the checkout stand runs from; StandError naming the install script when there is none."""
    given = os.environ.get("STAND_VLLM_PYTHON")
    if given:
        if not os.access(given, os.X_OK):
            raise StandError(f"STAND_VLLM_PYTHON={given} is not an executable")
        return given
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    here = pathlib.Path(__file__).resolve().parents[4]  # the checkout: src/stand/integrations/vllm/launch.py
    for root in (pathlib.Path.cwd(), here):
        python = root / VENV / "bin" / "python"
        if python.exists():
            return str(python)
    raise StandError("vLLM is not installed: run `bash scripts/setup-vllm.sh` (it makes .venv-vllm), or set "
                     "STAND_VLLM_PYTHON to a Python that has vLLM and stand")


def vllm_env(in_process: bool = True) -> dict:
    """The environment vLLM runs in; in_process: the engine core in the worker's process (our proposers' stats
    readable there, one process less)."""
    env = {**ENV, **os.environ}
    env["NUMBA_THREADING_LAYER"] = ENV["NUMBA_THREADING_LAYER"]
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def speculative_config(method: str, k: int = DEFAULT_K) -> dict | None:
    """vLLM's speculative_config for a vLLM method (None: plain decoding)."""
    kind = METHODS[check_method(method, "vllm")]
    if kind is None:
        return None
    if kind == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    if kind == "suffix":
        return {"method": "suffix", "num_speculative_tokens": k}
    return {"method": "custom_class", "model": PROPOSERS[kind], "num_speculative_tokens": k}


def hf_dir(model: str | None) -> str:
    """The Hugging Face directory vLLM reads for a stand model: a directory as it is; a GGUF file (None: the
    embedded default) converted once into stand's cache (`stand convert`), keyed by the file's name, size and
    modification time."""
    from stand.backends.load import check_path, default_model_path

    path = check_path(model or default_model_path())
    if os.path.isdir(path):
        return path
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = os.path.join(cache_dir(), "hf", f"{os.path.basename(path).removesuffix('.gguf')}-{key}")
    if not os.path.exists(os.path.join(out, "config.json")):
        _convert_into(path, out)
    return out


def _convert_into(gguf: str, out: str) -> None:
    """Converts into a fresh directory beside `out`, then renames it into place (a crash leaves no half model)."""
    from stand.backends.convert import convert_gguf

    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(gguf, tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def torch_dtype_name(dtype: str) -> str:
    """stand's --dtype as vLLM's: auto is bfloat16 where the CPU computes it natively, else float32 (as stand's)."""
    from stand.backends.load import resolve_dtype
    from stand.backends.machine import cpu_flags

    if dtype == "auto":
        return "bfloat16" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "float32"
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def serve_command(model_dir: str, method: str, host: str, port: int, dtype: str, k: int = DEFAULT_K,
                  max_model_len: int | None = None) -> list[str]:
    """vLLM's OpenAI-compatible server under vLLM's interpreter, with the speculative config of `method`. The module
    form, since the `vllm serve` command of vllm-cpu 0.32.0 fails on start (it asks for the version of a package
    named vllm, and the CPU build is installed as vllm-cpu); the arguments are the same. An API key goes in the
    environment (VLLM_API_KEY), never on the command line, which every user of the machine can read (ps)."""
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", host, "--port",
           str(port), "--dtype", dtype, "--generation-config", "vllm"]
    spec = speculative_config(method, k)
    if spec is not None:
        cmd += ["--speculative-config", json.dumps(spec)]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd


def stand_method(method: str) -> str:
    """The vLLM method for a stand --method: none -> plain vLLM, stand/consensus/ngrammys -> our proposers."""
    name = "vllm" if method == "none" else f"vllm-{method}"
    if name not in METHODS:
        raise StandError(f"--engine vllm runs --method none, stand, consensus, ngrammys (or ngram, suffix: vLLM's "
                         f"own), not {method!r}")
    return name


def serve_vllm(model: str | None, method: str, host: str, port: int, dtype: str, api_key: str | None = None,
               table: str | None = None, share_table: bool = False, engine: str = "vllm") -> None:
    """Replaces this process with `vllm serve` (OpenAI-compatible: n > 1, streaming, continuous batching) drafting
    with stand's proposer; prints the command first. --table and --share-table go to the STAND proposer."""
    if engine != "vllm":
        raise StandError(f"--engine must be stand or vllm, got {engine!r}")
    name = stand_method(method)
    options = {k: v for k, v in (("table", table), ("share_across_prompts", share_table)) if v}
    if options and name != "vllm-stand":
        raise StandError("--table and --share-table are options of --method stand")
    env = vllm_env(in_process=False)
    if options:
        env["STAND_VLLM_OPTIONS"] = json.dumps(options)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    cmd = serve_command(hf_dir(model), name, host, port, torch_dtype_name(dtype))
    print(" ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)
