"""The Hugging Face anchors of the benchmark (`hf`, `hf-pld`, `hf-batched`): `model.generate` called as a user would
call it, on the very model our rows use (so in the same dtype), with a generation config that samples from the
distribution our rows sample from."""

from __future__ import annotations

import torch

from stand.backends.torch import Target
from stand.params import SamplingParams


def has_hf_forward(target) -> bool:
    """Whether transformers can run the target's weights as they are (torch in float32 or bfloat16; int4 groups
    have no Hugging Face forward)."""
    return target.kind == "torch" and target.dtype != "int4"


class ForwardCount:
    """Counts the model's forward calls during Hugging Face generate (its verification passes)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def hf_config(target: Target, method: str, params: SamplingParams, n: int = 1):
    """A clean GenerationConfig: the model's own defaults (repetition penalty, top-k 50, ...) would sample from
    another distribution than our rows; this one is the target distribution that `params` asks for."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k) \
        if not params.greedy else dict(do_sample=False)
    extra = dict(prompt_lookup_num_tokens=10) if method == "hf-pld" else {}
    if method == "hf-batched" and not params.greedy:
        extra["num_return_sequences"] = n
    return GenerationConfig(max_new_tokens=params.max_new_tokens, eos_token_id=sorted(target.eos_ids),
                            pad_token_id=target.tokenizer.pad_token_id or min(target.eos_ids), **sampling, **extra)


def hf_generate(target: Target, prompt_ids: list[int], method: str, n: int,
                params: SamplingParams) -> tuple[list[list[int]], int]:
    """Hugging Face generate as a user would call it; returns (new ids per sample, forward passes x rows).

    hf, hf-pld: n calls, one sample each. hf-batched: one call for all n (num_return_sequences=n; greedy, which
    HF refuses that for, gets the same batch of n copies of the prompt).
    """
    config = hf_config(target, method, params, n)
    batched = method == "hf-batched"
    ids = torch.tensor([prompt_ids] * (n if batched and params.greedy else 1))  # [1 or n, P]
    calls = 1 if batched else n
    torch.manual_seed(params.seed or 0)
    outs = []
    with torch.inference_mode(), ForwardCount(target.model) as fc:
        for _ in range(calls):
            out = target.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)  # [R, P + T]
            outs += new_ids(target, out, len(prompt_ids))
    return outs, fc.calls * (n if batched else 1)


def new_ids(target: Target, out: torch.Tensor, prompt_len: int) -> list[list[int]]:
    """out [R, P + T]: each row's new ids up to and including the first EOS (padding after it dropped)."""
    rows = []
    for seq in out[:, prompt_len:].tolist():
        ends = [i for i, t in enumerate(seq) if t in target.eos_ids]
        rows.append(seq[: ends[0] + 1] if ends else seq)
    return rows
