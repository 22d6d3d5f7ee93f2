"""The llama.cpp backend: its logits, tree passes, cache moves, greedy equality and exact sampling, on tiny
random llamas written as float32 GGUF files in the test itself."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from extras import require, require_method
import torch

require("llama_cpp")

from lossless import K, PROMPT, V, engine_samples, marginal_pvalues  # noqa: E402
from stand.api import build_rows, make_engine  # noqa: E402
from stand.backends.llamacpp import LlamaCppModel  # noqa: E402
from stand.core.tree import DraftTree  # noqa: E402
from stand.core.verify import sampler_probs  # noqa: E402
from stand.methods import names  # noqa: E402
from stand.params import SamplingParams, SpecConfig  # noqa: E402
from tiny import byte_tokenizer, save_gguf, save_tiny_gguf, tiny_model, tiny_target  # noqa: E402

ATOL = 1e-4  # float32 weights: a multi-token pass may sum in another order than a one-token pass


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = save_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))
    return LlamaCppModel(path, byte_tokenizer())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The 8-token model of the exact-distribution tests, as GGUF."""
    path = str(tmp_path_factory.mktemp("gguf") / "small.gguf")
    save_gguf(tiny_model(vocab_size=V, seed=0, sharpness=6.0), [f"t{i}" for i in range(V)], path, bos=0, eos=V - 1)
    return LlamaCppModel(path, None)


def sequential(llm, prompt: list[int], path: list[int]) -> torch.Tensor:
    """[len(path) + 1, V] logits after prompt, then after each token of path, one token per decode."""
    cache = llm.new_cache()
    cache.prefill([prompt[:-1]])
    out = []
    for tok in [prompt[-1]] + path:
        out.append(cache.step([DraftTree()], [tok])[0][0].clone())
        cache.commit([[0]])
    return torch.stack(out)


def test_logits_match_the_hugging_face_model(llm):
    ids = [5, 17, 99, 3, 200, 41, 7]
    ref = tiny_target().model(input_ids=torch.tensor([ids])).logits[0]
    chunks = []
    llm.new_cache().prefill([ids], lambda rows, start, logits: chunks.append(logits.clone()))
    got = torch.cat(chunks)
    assert torch.allclose(got, ref, atol=2e-3), (got - ref).abs().max()


def random_tree(rng, nodes: int) -> DraftTree:
    tree = DraftTree()
    for i in range(nodes):
        tree.add(int(rng.integers(0, 256)), int(rng.integers(-1, i)))
    return tree


def test_tree_pass_equals_each_path_decoded_alone(llm):
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, 256, 20)]
    for nodes in (1, 5, 12):
        tree = random_tree(rng, nodes)
        cache = llm.new_cache()
        cache.prefill([prompt[:-1]])
        got = cache.step([tree], [prompt[-1]])[0].clone()
        for node in range(1, nodes + 1):
            path = []
            i = node - 1
            while i >= 0:
                path.insert(0, tree.tokens[i])
                i = tree.parents[i]
            ref = sequential(llm, prompt, path)[-1]
            assert torch.allclose(got[node], ref, atol=ATOL), (nodes, node, (got[node] - ref).abs().max())


def test_commit_keeps_only_the_accepted_path(llm):
    """After a tree step, the next logits equal sequential decoding of the accepted path (and not a sibling's)."""
    prompt = list(b"the cat sat on the mat and the cat")
    tree = DraftTree()
    a = tree.add(ord(" "))
    tree.add(ord("x"), -1)
    b = tree.add(ord("s"), a)
    tree.add(ord("q"), a)
    tree.add(ord("a"), b)
    for path, toks in (([0, 1, 3], [ord(" "), ord("s")]), ([0, 2], [ord("x")]), ([0, 1, 3, 5], [ord(" "), ord("s"), ord("a")]), ([0], [])):
        cache = llm.new_cache()
        cache.prefill([prompt[:-1]])
        cache.step([tree], [prompt[-1]])
        cache.commit([path])
        nxt = cache.step([DraftTree()], [ord("!")])[0][0]
        ref = sequential(llm, prompt, toks + [ord("!")])[-1]
        assert torch.allclose(nxt, ref, atol=ATOL), (path, (nxt - ref).abs().max())


def test_ragged_rows_sharing_a_prompt_and_leaving(llm):
    """Rows that share a prompt (one prefill), different prompts, different lengths; rows leave one by one."""
    prompts = [list(b"hello hello hello"), list(b"hello hello hello"), list(b"abc abc abc abc abc"), list(b"xyz")]
    ref = {}
    for i, p in enumerate(prompts):
        ref[i] = generate(llm, [p], "none", max_new_tokens=[12, 5, 9, 3][i])[0]
    for method in ("none", "pld", "stand"):
        rows = [build_rows([p], 1, SamplingParams(max_new_tokens=m, ignore_eos=True))[0][0]
                for p, m in zip(prompts, (12, 5, 9, 3))]
        make_engine(llm, SpecConfig(method=method)).run(rows)
        assert [r.generated for r in rows] == [ref[i] for i in range(4)], method


def generate(llm, prompts, method: str, max_new_tokens: int = 40, n: int = 1, temperature: float = 0.0):
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=0, ignore_eos=True)
    groups = build_rows(prompts, n, params)
    engine = make_engine(llm, SpecConfig(method=method))
    for rows in groups:
        engine.run(rows)
    return [r.generated for rows in groups for r in rows]


@pytest.mark.parametrize("method", names())
def test_greedy_equals_plain_greedy(llm, method):
    require_method(method)
    prompts = [list(b"the cat sat on the mat. the cat sat on the"), list(b"1, 2, 3, 1, 2, 3, 1, 2")]
    assert generate(llm, prompts, method, n=2) == generate(llm, prompts, "none", n=2)


def test_cache_reused_after_a_run(llm):
    first = generate(llm, [list(b"abcabc")], "stand")
    assert generate(llm, [list(b"abcabc")], "stand") == first


@torch.inference_mode()
def exact_joint(target, params: SamplingParams) -> np.ndarray:
    """[V]*K: the probability of every K-token continuation of PROMPT, from the backend's next-token logits."""
    joint = np.ones([V] * K)
    for d in range(K):
        heads = list(itertools.product(range(V), repeat=d))
        probs = sampler_probs(target.next_logits([PROMPT + list(h) for h in heads]), params).double().numpy()  # [V^d, V]
        joint *= probs.reshape([V] * d + [1] * (K - d - 1) + [V]).transpose(list(range(d)) + [K - 1] + list(range(d, K - 1)))
    return joint


SAMPLED = [("none", {}), ("pld", {}), ("recycle", {}), ("stand", {}), ("stand", {"stochastic": False}),
           ("stand-dynamic", {}), ("consensus", {"k": 2}), ("ngrammys", {}), ("stand+consensus", {"k": 2})]


@pytest.mark.parametrize("method,options", SAMPLED, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in SAMPLED])
def test_sampling_is_exact(small, method, options):
    params = SamplingParams(temperature=1.0)
    samples, per_step = engine_samples(small, SpecConfig(method=method, options=options), params, n=1500, batch=50)
    pvals = marginal_pvalues(samples, exact_joint(small, params))
    assert min(pvals.values()) > 1e-4, pvals
    if method != "none":
        assert 1.02 < per_step < K, per_step


def test_a_broken_verifier_fails_the_same_test(small, monkeypatch):
    """The power check: accepting every first child (no rejection) must be caught."""
    from test_mutants_power import accept_always

    accept_always(monkeypatch)
    params = SamplingParams(temperature=1.0)
    samples, _ = engine_samples(small, SpecConfig(method="stand"), params, n=1500, batch=50)
    assert min(marginal_pvalues(samples, exact_joint(small, params)).values()) < 1e-6


def test_bench_puts_llamacpp_anchors_beside_our_rows(tmp_path):
    from stand.lab.bench import BenchConfig, bench

    llm = LlamaCppModel(save_tiny_gguf(str(tmp_path / "long.gguf"), max_len=2048), byte_tokenizer())
    cfg = BenchConfig(["none", "stand", "llama.cpp", "llama.cpp-pld"], "champ", 1, 1,
                      params=SamplingParams(max_new_tokens=8, seed=0), warmup=False)
    rows = {r["method"]: r for r in bench(llm, cfg)}
    assert all(r["backend"] == "llama.cpp" and r["new_tokens"] > 0 for r in rows.values())
    assert rows["llama.cpp"]["speedup_vs_llamacpp"] == 1.0
    assert rows["none"]["speedup_vs_llamacpp"] == pytest.approx(
        rows["none"]["tok_per_s"] / rows["llama.cpp"]["tok_per_s"], abs=2e-3)


def prefill_logits(llm, ids: list[int]) -> torch.Tensor:
    chunks = []
    llm.new_cache().prefill([ids], lambda rows, start, logits: chunks.append(logits.clone()))
    return torch.cat(chunks)


@pytest.mark.parametrize("to, atol", [("f32", 1e-5), ("bf16", 0.1)])
def test_convert_re_encodes_a_gguf_for_llama_cpp(llm, tmp_path, to, atol):
    from typer.testing import CliRunner

    from stand.cli import app

    out = str(tmp_path / f"tiny-{to}.gguf")
    result = CliRunner().invoke(app, ["convert", llm.path, out, "--to", to])
    assert result.exit_code == 0 and os.path.isfile(out) and not os.path.exists(out + ".part"), result.output
    ids = [5, 17, 99, 3, 200, 41, 7]
    want, got = prefill_logits(llm, ids), prefill_logits(LlamaCppModel(out, byte_tokenizer()), ids)
    assert torch.allclose(got, want, atol=atol), (got - want).abs().max()
    assert (got != want).any() if to == "bf16" else True  # bf16 really rounds: the file is not a copy


@pytest.mark.parametrize("to, exists", [("bf16", True), ("q3", False)])
def test_convert_refuses_an_existing_file_or_an_unknown_type(llm, tmp_path, to, exists):
    from typer.testing import CliRunner

    from stand.cli import app

    out = tmp_path / "out.gguf"
    if exists:
        out.write_text("keep me")
    result = CliRunner().invoke(app, ["convert", llm.path, str(out), "--to", to])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert ("exists" in result.output) if exists else ("unknown --to 'q3'" in result.output)
    assert out.read_text() == "keep me" if exists else not out.exists()
