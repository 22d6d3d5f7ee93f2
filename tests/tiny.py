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


def _permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotary layout (halves) -> GGUF's (interleaved pairs), as llama.cpp's converter writes Q and K."""
    out, inp = w.shape
    return w.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def save_tiny_gguf(path: str, seed: int = 0, sharpness: float = 4.0, **kw) -> str:
    """The tiny llama with the byte vocabulary as a GGUF file (float32 weights) llama.cpp runs; returns the path.
    Its logits equal the Hugging Face model's up to float32 rounding."""
    target = tiny_target(seed=seed, sharpness=sharpness, **kw)
    tok = target.tokenizer
    tokens = [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    return save_gguf(target.model, tokens, path, bos=tok.bos_token_id, eos=tok.eos_token_id)


MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def save_gguf(model, tokens: list[str], path: str, bos: int, eos: int, matrices: str = "F32",
              table: str = "F32") -> str:
    """A Hugging Face llama (float32) and its token strings as a GGUF file; tokens "<...>" are control tokens.
    matrices: the layer matrices' type, table: the embedding's and output head's ("F32", or a type gguf's numpy
    quantizer writes: "Q4_0", "Q4_1", "Q8_0")."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if matrices == "F32" else gguf.LlamaFileType[f"MOSTLY_{matrices}"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<") and len(t) > 1 else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_token_merges([f"{tokens[0]} {tokens[1]}"])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    for name, t in _gguf_tensors(model, cfg):
        kind = matrices if name.split(".")[-2] in MATRICES else table if "token_embd" in name or "output." in name \
            else "F32"
        data = t.detach().float().contiguous().numpy()
        if kind == "F32":
            w.add_tensor(name, data)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_tensors(model, cfg):
    """(GGUF name, tensor) of every weight of a Hugging Face llama."""
    yield "token_embd.weight", model.model.embed_tokens.weight
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
        yield f"blk.{i}.attn_q.weight", _permute_rotary(a.q_proj.weight, cfg.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", _permute_rotary(a.k_proj.weight, cfg.num_key_value_heads)
        yield f"blk.{i}.attn_v.weight", a.v_proj.weight
        yield f"blk.{i}.attn_output.weight", a.o_proj.weight
        yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
        yield f"blk.{i}.ffn_gate.weight", m.gate_proj.weight
        yield f"blk.{i}.ffn_up.weight", m.up_proj.weight
        yield f"blk.{i}.ffn_down.weight", m.down_proj.weight
    yield "output_norm.weight", model.model.norm.weight
    yield "output.weight", model.lm_head.weight
