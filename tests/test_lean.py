"""The lean forward against the Hugging Face forward: logits, KV compaction, greedy decoding."""

import pytest
import torch

from stand.drafters.registry import make_drafter
from stand.core.sequence import Row
from stand.engine import Engine
from stand.errors import StandError
from stand.backends.kv import prefill_batch, tree_batch
from stand.backends.lean import CACHE_CHUNK, LeanCache, LeanTarget
from stand.params import SamplingParams, SpecConfig
from tiny import tiny_target
from stand.core.tree import DraftTree


def branching_tree(tokens: list[int]) -> DraftTree:
    """Node i hangs under node (i - 1) // 2: a binary tree, so siblings must not see each other."""
    tree = DraftTree()
    for i, tok in enumerate(tokens):
        tree.add(tok, (i - 1) // 2 if i else -1)
    return tree


@torch.inference_mode()
def drive(target, prompts, steps):
    """Prefill ragged prompts, replicate them (keep_rows with repeats), run tree steps with commits.

    steps: list of (trees per row, accepted paths per row). Returns every forward's logits (float32).
    """
    out = []
    cache = target.inner_cache()
    out.append(target.forward(cache, prefill_batch(prompts)).float())
    lengths = [len(p) for p in prompts]
    keep = [0, 1, 1]  # row 1 twice, as the engine replicates one prompt for N samples
    cache.keep_rows(keep, max(lengths))
    lengths = [lengths[i] for i in keep]
    for trees, paths in steps:
        S = len(cache)
        assert S == max(lengths)
        batch = tree_batch(trees, [7 + b for b in range(len(trees))], lengths, S)
        out.append(target.forward(cache, batch).float())
        lengths = cache.commit(paths, lengths, S)
    # a last step of single tokens reads everything the commits moved
    S = len(cache)
    out.append(target.forward(cache, tree_batch([DraftTree()] * len(lengths), [3] * len(lengths), lengths, S)).float())
    return out


PROMPTS = [[5, 9, 11, 40, 41, 42, 43, 44, 45], [12, 13, 14, 15, 16]]
STEPS = [
    ([branching_tree([50, 51, 52, 53, 54]), branching_tree([60, 61]), DraftTree()], [[0, 1, 4], [0, 2], [0]]),
    ([branching_tree([70, 71, 72]), DraftTree.chain([80, 81, 82, 83]), branching_tree([90] * 7)],
     [[0], [0, 1, 2, 3, 4], [0, 2, 5]]),
]


def both(seed=0, dtype=torch.float32, **kw):
    hf = tiny_target(seed=seed, dtype=dtype, **kw)
    return hf, LeanTarget.from_target(hf)


def test_lean_logits_equal_hf_float32():
    hf, lean = both()
    ref, got = drive(hf, PROMPTS, STEPS), drive(lean, PROMPTS, STEPS)
    assert len(ref) == len(got) == 4
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        assert torch.allclose(r, g, atol=1e-4, rtol=0), (r - g).abs().max()


def test_lean_without_prepacking_equal_hf():
    hf = tiny_target(seed=1)
    lean = LeanTarget.from_target(hf, linear="dense")
    for r, g in zip(drive(hf, PROMPTS, STEPS), drive(lean, PROMPTS, STEPS)):
        assert torch.allclose(r, g, atol=1e-4, rtol=0)


@pytest.mark.parametrize("linear", ["auto", "dense", "fp32"])
def test_lean_logits_close_bfloat16(linear):
    """Within bfloat16 rounding: where lean runs HF's kernels (several tokens a row) it is much closer to HF bfloat16
    than HF bfloat16 is to float32; with one token a row (one_query_attention, float32 inside) it is no farther from
    float32 than HF bfloat16 is."""
    hf = tiny_target(seed=2, dtype=torch.bfloat16)
    exact = drive(tiny_target(seed=2, dtype=torch.float32), PROMPTS, STEPS)
    lean = LeanTarget.from_target(hf, linear=linear)
    for r, g, e in zip(drive(hf, PROMPTS, STEPS), drive(lean, PROMPTS, STEPS), exact):
        rounding = (r - e).abs().max()
        assert rounding > 0
        if r.shape[1] > 1:
            assert (r - g).abs().max() <= 0.5 * rounding
        else:
            assert (g - e).abs().max() <= 1.1 * rounding


def test_lean_qwen2_with_qkv_bias_equal_hf():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stand.backends.torch import Target

    torch.manual_seed(3)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # biases are zero at init: make them count
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.bias.normal_()
    hf = Target(model, None, "tiny-qwen2", torch.float32)
    lean = LeanTarget.from_target(hf)
    for r, g in zip(drive(hf, PROMPTS, STEPS), drive(lean, PROMPTS, STEPS)):
        assert torch.allclose(r, g, atol=1e-4, rtol=0)


def test_single_row_one_token_uses_no_mask_and_matches():
    hf, lean = both(seed=4)
    with torch.inference_mode():
        caches = [t.inner_cache() for t in (hf, lean)]
        for t, c in zip((hf, lean), caches):
            t.forward(c, prefill_batch([[1, 2, 3, 4]]))
        for tok in (5, 6, 7):
            outs = [t.forward(c, tree_batch([DraftTree()], [tok], [len(c)], len(c))) for t, c in zip((hf, lean), caches)]
            for c in caches:
                c.commit([[0]], [len(c) - 1], len(c) - 1)
            assert torch.allclose(outs[0], outs[1], atol=1e-4, rtol=0)


def test_cache_grows_past_a_chunk_and_keeps_content():
    hf, lean = both(seed=5, max_len=CACHE_CHUNK * 2)
    prompt = list(range(CACHE_CHUNK + 10))
    prompt = [t % 250 for t in prompt]
    with torch.inference_mode():
        ref = hf.forward(hf.inner_cache(), prefill_batch([prompt]))
        cache = lean.inner_cache()
        lean.forward(cache, prefill_batch([prompt[:100]]))
        for start in range(100, len(prompt), 50):  # chunks of a causal prefill through tree steps
            chunk = prompt[start:start + 50]
            got = lean.forward(cache, tree_batch([DraftTree.chain(chunk[1:])], [chunk[0]], [len(cache)], len(cache)))
            cache.commit([list(range(len(chunk)))], [len(cache) - len(chunk)], len(cache) - len(chunk))
        assert cache.capacity >= len(prompt)
        assert len(cache) == len(prompt)
        assert torch.allclose(ref[0, -len(chunk):], got[0], atol=1e-4, rtol=0)


@torch.inference_mode()
def test_keep_rows_repeats_and_drops():
    cache = LeanCache(layers=2, kv_heads=1, head_dim=2, dtype=torch.float32)
    cache.reserve(3, 4)
    cache.kv.copy_(torch.arange(cache.kv.numel(), dtype=torch.float32).view_as(cache.kv))
    before = cache.kv.clone()
    cache.length = 4
    cache.keep_rows([2, 0, 0], 3)
    assert len(cache) == 3 and cache.kv.shape[2] == 3
    assert torch.equal(cache.kv[..., :3, :], before[:, :, [2, 0, 0], :, :3])


@torch.inference_mode()
def test_commit_moves_every_layer():
    cache = LeanCache(layers=3, kv_heads=2, head_dim=2, dtype=torch.float32)
    cache.reserve(2, 8)
    cache.kv.copy_(torch.randn_like(cache.kv))
    before = cache.kv.clone()
    cache.length = 8
    # cache_len 5, row 0 had length 5 and keeps nodes 0, 2; row 1 had length 3 and keeps node 0
    assert cache.commit([[0, 2], [0]], [5, 3], 5) == [7, 4]
    assert len(cache) == 7
    assert torch.equal(cache.kv[:, :, 0, :, 5], before[:, :, 0, :, 5])
    assert torch.equal(cache.kv[:, :, 0, :, 6], before[:, :, 0, :, 7])
    assert torch.equal(cache.kv[:, :, 1, :, 3], before[:, :, 1, :, 5])
    assert torch.equal(cache.kv[:, :, 1, :, :3], before[:, :, 1, :, :3])


@pytest.mark.parametrize("method", ["none", "pld"])
def test_greedy_decoding_lean_equals_hf(method):
    hf, lean = both(seed=6)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [9, 8, 7, 6], [9, 8, 7, 6]]
    outs = []
    for target in (hf, lean):
        rows = [Row(list(p), params, group=i, index=0) for i, p in enumerate(prompts)]
        Engine(target, make_drafter(SpecConfig(method=method), target.vocab_size)).run(rows)
        outs.append([r.generated for r in rows])
    assert outs[0] == outs[1]
    assert all(len(g) > 0 for g in outs[0])


def test_unsupported_architecture_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    from stand.backends.torch import Target

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(StandError, match="architecture 'gpt2'"):
        LeanTarget.from_target(Target(model, None, "gpt2", torch.float32))


@pytest.mark.slow
def test_real_model_greedy_lean_equals_hf_float32():
    from stand.backends.load import load_model

    hf = load_model(None, "float32", backend="torch", forward="hf")
    lean = load_model(None, "float32", backend="torch", forward="lean")
    assert isinstance(lean, LeanTarget) and not isinstance(hf, LeanTarget)
    params = SamplingParams(max_new_tokens=48, temperature=0.0)
    prompt = hf.encode("What is 12 times 7? Answer briefly.")
    outs = []
    for target in (hf, lean):
        rows = [Row(list(prompt), params)]
        Engine(target, make_drafter(SpecConfig(method="none"), target.vocab_size)).run(rows)
        outs.append(rows[0].generated)
    assert outs[0] == outs[1]


def test_load_model_backends(tmp_path):
    from stand.backends.load import load_model
    from tiny import save_tiny

    path = save_tiny(str(tmp_path / "tiny"))
    assert isinstance(load_model(path, "float32"), LeanTarget)
    assert isinstance(load_model(path, "float32", forward="lean"), LeanTarget)
    assert not isinstance(load_model(path, "float32", forward="hf"), LeanTarget)
    with pytest.raises(StandError, match="forward"):
        load_model(path, "float32", forward="fast")
    with pytest.raises(StandError, match="backend"):
        load_model(path, "float32", backend="fast")


def test_profile_curves_and_json(tmp_path):
    from stand.lab.profile import ProfileConfig, as_json, cost_curves, profile_targets, table_lines

    hf = tiny_target(seed=7)
    curves = cost_curves(profile_targets(hf), ProfileConfig(tokens=(1, 4), batches=(2,), cache_len=20, reps=2))
    data = as_json(curves)
    assert set(data) == {"ours", "hf", "batch_ours", "batch_hf"}
    assert set(data["ours"]) == {"1", "4"} and set(data["batch_hf"]) == {"2"}
    assert all(v > 0 for d in data.values() for v in d.values())
    assert len(table_lines(curves)) == 4


def test_profile_cli_writes_json(tmp_path):
    import json

    from typer.testing import CliRunner

    from stand.cli import app
    from tiny import save_tiny

    path = save_tiny(str(tmp_path / "tiny"))
    out = tmp_path / "curve.json"
    res = CliRunner().invoke(app, ["profile", "--model", path, "--dtype", "float32", "--cache-len", "16",
                                   "--reps", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["ours"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert set(data["batch_ours"]) == {"4", "8", "16"}
    assert "64 tokens" in res.output


def test_lean_llama_with_attention_bias_equal_hf():
    from transformers import LlamaConfig, LlamaForCausalLM

    from stand.backends.torch import Target

    torch.manual_seed(8)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, attention_bias=True, max_position_embeddings=256,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
                m.bias.normal_()
    hf = Target(model, None, "tiny-llama-bias", torch.float32)
    lean = LeanTarget.from_target(hf)
    for r, g in zip(drive(hf, PROMPTS, STEPS), drive(lean, PROMPTS, STEPS)):
        assert torch.allclose(r, g, atol=1e-4, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_is_the_fused_kernel_in_float32(masked):
    """The bfloat16 one-query path (every plain step) computes what scaled_dot_product_attention computes in float32,
    grouped-query heads and the tree mask included, to bfloat16 rounding of its output."""
    from stand.backends.lean import one_query_attention

    torch.manual_seed(0)
    B, H, Hkv, S, D = 3, 6, 2, 40, 16
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    mask = (torch.rand(B, 1, 1, S) < 0.7) | (torch.arange(S) == S - 1) if masked else None
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    got = one_query_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.3)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.allclose(got.float(), want, atol=0.03), (got.float() - want).abs().max()
    shuffled = one_query_attention(q.bfloat16(), k.bfloat16().roll(1, dims=1), v.bfloat16(), mask, 0.3)
    assert not torch.allclose(shuffled.float(), want, atol=0.03)  # the head grouping matters: the check can fail
