"""llama.cpp's own generation as bench anchors, on the same GGUF file, prompts and sampling settings:
`llama.cpp` (llama-cpp-python's high-level `Llama.generate`, its own sampler) and `llama.cpp-pld` (the same with
its prompt-lookup draft model, 10 tokens). The high-level API decodes one sequence at a time: n samples run
one after another (llama.cpp's batched throughput is the engine's `none` with n rows on this backend)."""

from __future__ import annotations

import functools

from stand.errors import StandError
from stand.params import SamplingParams

PLD_TOKENS = 10


@functools.lru_cache(maxsize=2)
def _llama(path: str, pld: bool, n_ctx: int = 4096):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from stand.backends.llamacpp import threads

    draft = LlamaPromptLookupDecoding(num_pred_tokens=PLD_TOKENS) if pld else None
    return Llama(model_path=path, n_ctx=n_ctx, n_threads=threads(), n_threads_batch=threads(), draft_model=draft,
                 flash_attn=False, verbose=False)


def gguf_file(target) -> str | None:
    """The GGUF file a loaded backend runs: llama.cpp's, or the int4 torch backend's source file."""
    path = target.path if getattr(target, "kind", None) == "llama.cpp" else getattr(target, "source", None)
    return path if isinstance(path, str) and path.endswith(".gguf") else None


def anchor_generate(target, method: str, prompt_ids: list[int], n: int, params: SamplingParams) -> list[list[int]]:
    """n samples of new token ids from llama.cpp's own loop on the target's GGUF file; the sampler keeps only
    temperature, top-k and top-p (min-p, typical-p and penalties off), so it draws from the same distribution as
    ours."""
    path = gguf_file(target)
    if path is None:
        raise StandError(f"the {method} anchor needs a .gguf model on the llama.cpp backend or on torch with "
                         "--dtype int4")
    llm = _llama(path, method == "llama.cpp-pld")
    outs = []
    for i in range(n):
        llm.set_seed(0 if params.seed is None else params.seed + i)
        outs.append(_one(llm, prompt_ids, params, target.eos_ids))
    return outs


def _one(llm, prompt_ids: list[int], params: SamplingParams, eos_ids: set[int]) -> list[int]:
    """One sample, from a cold start: llama-cpp-python keeps the KV of its last call and would skip the part of the
    prompt it shares with it (the whole prompt on a repeat or after the warm-up); our rows prefill their prompt."""
    llm.reset()
    out = []
    for tok in llm.generate(prompt_ids, top_k=params.top_k, top_p=params.top_p, min_p=0.0, typical_p=1.0,
                            temp=params.temperature, repeat_penalty=1.0):
        out.append(int(tok))
        if (tok in eos_ids and not params.ignore_eos) or len(out) >= params.max_new_tokens:
            break
    return out
