"""A tiny random-weight llama with a byte-level tokenizer, built in-process for fast tests."""

from __future__ import annotations

import torch

from stand.backends.torch import Target

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """Every byte is a token; three special tokens follow them (ids 256, 257, 258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(vocab_size: int = 259, seed: int = 0, hidden: int = 64, layers: int = 2, sharpness: float = 1.0,
               max_len: int = 512, dtype: torch.dtype = torch.float32):
    """A random llama; `sharpness` scales the output head (larger = peakier next-token distributions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_len, tie_word_embeddings=False,
                         bos_token_id=vocab_size - 3 if vocab_size >= 259 else 0,
                         eos_token_id=vocab_size - 2 if vocab_size >= 259 else vocab_size - 1,
                         pad_token_id=vocab_size - 1 if vocab_size >= 259 else 0,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model.to(dtype)


def tiny_target(seed: int = 0, sharpness: float = 4.0, dtype: torch.dtype = torch.float32, **kw) -> Target:
    """The tiny model with the byte tokenizer, as a Target."""
    tok = byte_tokenizer()
    model = tiny_model(vocab_size=len(tok), seed=seed, sharpness=sharpness, dtype=dtype, **kw)
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return Target(model, tok, "tiny-random", dtype)


def save_tiny(path: str, seed: int = 0, sharpness: float = 4.0) -> str:
    """Writes the tiny model and tokenizer as a Hugging Face directory; returns the path."""
    target = tiny_target(seed=seed, sharpness=sharpness)
    target.model.save_pretrained(path)
    target.tokenizer.save_pretrained(path)
    return path
