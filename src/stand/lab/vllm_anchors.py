"""vLLM rows of `stand bench`: `vllm` (plain decoding), `vllm-ngram` and `vllm-suffix` (vLLM's own model-free
drafters; suffix is SuffixDecoding on arctic-inference), `vllm-stand`, `vllm-consensus` and `vllm-ngrammys` (stand's
proposers inside vLLM, integrations/vllm).

Each method's engine starts once, in a subprocess of vLLM's interpreter (.venv-vllm), on the bench's model (a GGUF
file is converted to a Hugging Face directory once, `stand convert`), in the dtype our torch rows use (bfloat16
where the CPU has it natively), and stays up for the whole bench, so its start-up is never timed. Problems go one
at a time with the prompt ids our rows decode (the chat template applied by stand) and the same sampling
(temperature, top-p, top-k, max new tokens, seed; n samples as one request, each sample its own seed; the model's
end-of-sequence ids). A row's time runs from encoding the prompt to decoding the samples, as our rows' does.
STAND_VLLM_K sets num_speculative_tokens (default 5) for every speculative method alike.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections import Counter

from stand.errors import StandError
from stand.integrations.vllm.launch import DEFAULT_K, METHODS, hf_dir, torch_dtype_name

_ENGINES: dict[tuple, object] = {}  # (model dir, method, dtype, k, options) -> VllmProcess, for this process


def engine_k() -> int:
    text = os.environ.get("STAND_VLLM_K", str(DEFAULT_K))
    if not text.isdigit() or int(text) < 1:
        raise StandError(f"STAND_VLLM_K must be an integer >= 1, got {text!r}")
    return int(text)


def engine_dtype(target) -> str:
    """vLLM's dtype for the bench: the torch target's own, else stand's auto choice."""
    dtype = getattr(target, "dtype", None)
    name = str(dtype).removeprefix("torch.")
    return name if name in ("bfloat16", "float32", "float16") else torch_dtype_name("auto")


def engine(model: str | None, target, method: str, temperature: float):
    """The method's vLLM engine for this model, started on first use. STAND's proposer is told the temperature
    (its table stores the distribution the sampler draws from)."""
    from stand.integrations.vllm.client import EngineConfig, VllmProcess

    options = {"temperature": temperature} if METHODS[method] == "stand" else {}
    key = (hf_dir(model), method, engine_dtype(target), engine_k(), json.dumps(options))
    if key not in _ENGINES:
        env = {"STAND_VLLM_OPTIONS": key[4]} if options else {}
        _ENGINES[key] = VllmProcess(EngineConfig(key[0], method, dtype=key[2], k=key[3], env=env,
                                                 max_model_len=min(target.max_len, 8192)))
    return _ENGINES[key]


@atexit.register
def close_engines() -> None:
    while _ENGINES:
        _ENGINES.popitem()[1].close()


def vllm_generate(model: str | None, target, method: str, prompt_ids: list[int], n: int, params) -> tuple[list, dict]:
    """n samples of new token ids for one prompt, and vLLM's speculative counters of the call. With ignore_eos no
    stop ids are sent: vLLM's ignore_eos skips only its own end id and still stops on every listed stop id."""
    stops = [] if params.ignore_eos else sorted(target.eos_ids)
    reply = engine(model, target, method, params.temperature).generate(
        [prompt_ids], n, params.temperature, params.max_new_tokens, top_p=params.top_p, top_k=params.top_k,
        seed=params.seed, stop_token_ids=stops, ignore_eos=params.ignore_eos)
    return reply.outputs[0], reply.spec


def vllm_run(model: str | None, target, method: str, prompt: str, n: int, params) -> dict:
    """One problem: new tokens, seconds, verification passes summed over the samples (tokens less accepted draft
    tokens), stand's drafting seconds (None for vLLM's own drafters) and the texts."""
    t = time.perf_counter()
    outs, spec = vllm_generate(model, target, method, target.encode(prompt), n, params)
    texts = [target.decode(o) for o in outs]
    seconds = time.perf_counter() - t
    tokens = sum(map(len, outs))
    ours = METHODS[method] in ("stand", "consensus", "ngrammys")
    return {"new_tokens": tokens, "seconds": seconds, "steps": tokens - int(spec.get("num_accepted_tokens", 0)),
            "draft_seconds": spec.get("draft_seconds") if ours else None, "texts": texts, "accepted": Counter()}
