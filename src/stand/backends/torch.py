"""The PyTorch backend: a Hugging Face model (any architecture that takes a 4D attention mask), whose
forward runs through transformers or, for llama/qwen2, through our lean forward (lean.py)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass

import torch

from stand.backends.kv import HFCache, TreeBatch, additive_mask, prefill_batch, tree_batch
from stand.backends.protocol import PREFILL_CHUNK, OnLogits
from stand.core.tree import DraftTree
from stand.errors import StandError

# Architectures whose Hugging Face attention takes a 4D float mask with explicit position ids.
TREE_MASK_ARCHS = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite"}


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of messages through the tokenizer's chat template, with the assistant's turn opened
    (without a template: "role: content" lines, then "assistant:")."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode("\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def encode(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a prompt, through the chat template (one user message) when chat and the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


class TokenizerText:
    """Text in and out through a Hugging Face tokenizer (`self.tokenizer`; None: no text, ids only)."""

    tokenizer: object

    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        return encode(self.tokenizer, prompt, chat)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        return encode_messages(self.tokenizer, messages)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""


@dataclass
class Target(TokenizerText):
    """The model being sped up, with its tokenizer and the facts the engine needs (the torch Backend)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    dtype: torch.dtype
    kind = "torch"
    pads = True  # a pass can be widened: padding positions in tree_batch
    max_sequences = None
    max_pass_tokens = None

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

    def new_cache(self) -> "TorchCache":
        return TorchCache(self)

    def inner_cache(self) -> HFCache:
        return HFCache()

    @torch.inference_mode()
    def forward(self, cache: HFCache, batch: TreeBatch, all_logits: bool = True) -> torch.Tensor:
        """Writes the batch's KV after the cache's slots; returns logits [B, T, V] (or [B, 1, V]) on the CPU."""
        dev = self.model.device
        mask = additive_mask(batch.allowed, self.dtype).to(dev)  # [B, 1, T, S + T]
        out = self.model(input_ids=batch.input_ids.to(dev), position_ids=batch.position_ids.to(dev),
                         attention_mask=mask, past_key_values=cache.cache, use_cache=True,
                         logits_to_keep=0 if all_logits else 1)
        return out.logits.cpu()

    @torch.inference_mode()
    def next_logits(self, contexts: list[list[int]]) -> torch.Tensor:
        x = torch.tensor(contexts, dtype=torch.long, device=self.model.device)  # [N, L]
        return self.model(input_ids=x, use_cache=False).logits[:, -1].float().cpu()  # [N, V]

    def fingerprint(self) -> str:
        """A short hash of the name, vocabulary size, dtype and some of the weights."""
        h = hashlib.sha256(f"{self.name}|{self.vocab_size}|{self.dtype}".encode())
        for w in (self.model.get_input_embeddings().weight, self.model.get_output_embeddings().weight):
            h.update(w.detach()[:: max(1, w.shape[0] // 64)].float().contiguous().numpy().tobytes())
        for p in [p for _, p in self.model.named_parameters() if p.ndim == 2][:4]:
            h.update(p.detach()[:8].float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]



class TorchCache:
    """Rows of one batch with ragged lengths in a padded cache (kv.py): row b's committed KV in slots [0, L_b)."""

    def __init__(self, target: Target):
        self.target, self.inner, self.lengths = target, target.inner_cache(), []

    @torch.inference_mode()
    def prefill(self, prefixes: list[list[int]], on_logits: OnLogits | None = None,
                reuse: list[tuple[object, int] | None] | None = None) -> None:
        """Each distinct prefix runs alone, PREFILL_CHUNK tokens per forward (after the slots it copies from a
        parked row: reuse); its rows are copies of it, appended after the rows already here (slots padded to the
        longest)."""
        uniq: dict[tuple, list[int]] = {}
        for b, p in enumerate(prefixes):
            uniq.setdefault(tuple(p), []).append(b)
        base = len(self.lengths)
        for prefix, members in uniq.items():
            part = TorchCache(self.target)
            part.lengths = [0]
            if reuse and reuse[members[0]]:
                handle, k = reuse[members[0]]
                part.inner, part.lengths = handle.take(0, k), [k]
            for start in range(part.lengths[0], len(prefix), PREFILL_CHUNK):
                logits = part._chunk(list(prefix[start:start + PREFILL_CHUNK]), on_logits is not None)
                if on_logits is not None:
                    on_logits(members, start, logits)
            self._append(part)
        part_row = {key: base + i for i, key in enumerate(uniq)}  # each distinct prefix's row, as appended
        self.lengths = self.lengths[:base] + [len(p) for p in prefixes]
        self.inner.keep_rows(list(range(base)) + [part_row[tuple(p)] for p in prefixes], max(self.lengths))

    def _chunk(self, tokens: list[int], want: bool) -> torch.Tensor | None:
        """Appends tokens to this one-row cache; their logits [C, V] if wanted."""
        L = self.lengths[0]
        if L == 0:
            logits = self.target.forward(self.inner, prefill_batch([tokens]), want)  # [1, C, V]
        else:
            batch = tree_batch([DraftTree.chain(tokens[1:])], [tokens[0]], [L], L)
            logits = self.target.forward(self.inner, batch, want)
        self.lengths = [L + len(tokens)]
        return logits[0] if want else None

    def _append(self, part: "TorchCache") -> None:
        self.inner.extend(part.inner, (len(self.lengths), 1))
        self.lengths.append(part.lengths[0])

    @torch.inference_mode()
    def step(self, trees: list[DraftTree], roots: list[int], width: int | None = None) -> torch.Tensor:
        """Logits [B, T, V], T the widest tree + 1; a pass widened to `width` drops the padding's logits here and
        its KV at commit (slots past the accepted paths)."""
        self._S = max(self.lengths)
        logits = self.target.forward(self.inner, tree_batch(trees, roots, self.lengths, self._S, width))
        return logits[:, : max(len(t) for t in trees) + 1]  # [B, T, V]

    def commit(self, paths: list[list[int]]) -> None:
        self.lengths = self.inner.commit(paths, self.lengths, self._S)

    def keep(self, rows: list[int]) -> None:
        self.lengths = [self.lengths[i] for i in rows]
        if rows:
            self.inner.keep_rows(rows, max(self.lengths))
        else:  # empty: the next prefill starts afresh
            self.inner = self.target.inner_cache()

    def park(self, row: int) -> tuple[object, int]:
        """A copy of the row's cached slots, kept apart from the batch (keep() does not touch it)."""
        return self.inner.take(row, self.lengths[row]), self.lengths[row]

    def unpark(self, handle: object) -> None:
        """Nothing to free but the copy itself."""


def _check_arch(model) -> None:
    arch = getattr(model.config, "model_type", "?")
    if arch not in TREE_MASK_ARCHS:
        raise StandError(f"architecture {arch!r} has no tree-attention support in stand "
                         f"(supported: {', '.join(sorted(TREE_MASK_ARCHS))})")


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_tokenizer(path: str):
    """The tokenizer of a Hugging Face directory or a .gguf file."""
    from transformers import AutoTokenizer

    quiet_transformers()
    directory, kwargs = _where(path)
    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except Exception as e:  # a truncated or foreign file fails deep in transformers, gguf or safetensors
        raise StandError(f"could not load the tokenizer of {path}: {load_failure(e)}") from e


def load_failure(e: Exception) -> str:
    """One line on why a model or tokenizer file could not be read (what a truncated file raises varies)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    kind = type(e).__name__ if not type(e).__name__.islower() else f"{type(e).__module__}.{type(e).__name__}"
    return f"{kind}: {text[:300]} (a truncated or damaged file?)"


def _where(path: str) -> tuple[str, dict]:
    if os.path.isfile(path):
        directory, name = os.path.split(os.path.abspath(path))
        return directory, {"gguf_file": name}
    return path, {}


@functools.lru_cache(maxsize=4)
def load_hf(path: str, torch_dtype: torch.dtype) -> Target:
    """A Target from a Hugging Face model directory or a .gguf file (de-quantised on load)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    directory, kwargs = _where(path)
    if "gguf_file" in kwargs:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, **kwargs)
    except Exception as e:  # SafetensorError, struct.error, a reshape's ValueError...: the file, not stand
        raise StandError(f"could not load model from {path}: {load_failure(e)}") from e
    _check_arch(model)
    model.eval()
    return Target(model, tokenizer, os.path.basename(path.rstrip("/")), torch_dtype)
