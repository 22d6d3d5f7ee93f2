"""What a request may ask for: every limit and every bad input gets its answer (400 naming the field, 413), and
the fields we do honour change the output. The real uvicorn server on 127.0.0.1, the tiny model."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from typer.testing import CliRunner

from stand.cli import app as cli_app
from stand.drafters.ngram_table import NGramTable
from stand.drafters.registry import make_drafter
from stand.errors import StandError
from stand.params import SpecConfig
from stand.server import ServerConfig
from stand.server.config import is_loopback, startup_warnings
from stand.server.memory import (CHUNK_COPIES, DEFAULT_SHAPE, PASS_COPIES, STEP_TOKENS, ModelShape, kv_tokens, shape_of,
                                 table_bytes, worst_case)
from stand.server.protocol import MIN_TEMPERATURE, NEUTRAL, CommonRequest
from tiny import save_tiny
from test_server import healthy, running, wait_until

PROMPT = "Tell me a story about a cat."
LIMITS = dict(default_max_tokens=20, max_tokens_limit=400, max_n=4, max_prompt_tokens=200, max_live_rows=8,
              max_live_tokens=2000, max_body_bytes=20_000)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def served(model_dir):
    with running(ServerConfig(model=model_dir, method="stand", **LIMITS)) as (base, app):
        wait_until(lambda: healthy(base), 120)
        yield base, app


@pytest.fixture(scope="module")
def base(served):
    return served[0]


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)


def post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=60)


def completion(**kw) -> dict:
    return {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, **kw}


def chat(**kw) -> dict:
    return {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0, **kw}


# ---- 400 naming the field, 413 ---------------------------------------------------------------------------

BAD = [
    ("/v1/completions", completion(max_tokens=401), "max_tokens"),
    ("/v1/chat/completions", chat(max_completion_tokens=401), "max_completion_tokens"),
    ("/v1/completions", completion(max_tokens=0), "max_tokens"),
    ("/v1/completions", completion(n=5), "n"),
    ("/v1/completions", completion(prompt=["a", "b", "c"], n=2), "prompt"),  # 6 rows > max_n = 4
    ("/v1/completions", completion(prompt="x" * 300), "prompt"),  # 300 tokens > max_prompt_tokens = 200
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "x" * 300}]), "messages"),
    ("/v1/completions", completion(seed=-1), "seed"),
    ("/v1/completions", completion(seed=2**63), "seed"),
    ("/v1/completions", completion(temperature=2.5), "temperature"),
    ("/v1/completions", completion(top_k=-2), "top_k"),
    ("/v1/completions", completion(top_p=0), "top_p"),
    ("/v1/completions", completion(min_tokens=5), "min_tokens"),
    ("/v1/chat/completions", chat(repetition_penalty=1.3), "repetition_penalty"),
    ("/v1/completions", completion(min_p=0.1), "min_p"),
    ("/v1/completions", completion(presence_penalty=0.5), "presence_penalty"),
    ("/v1/completions", completion(logit_bias={"5": 1.0}), "logit_bias"),
    ("/v1/completions", completion(stop_token_ids=[5]), "stop_token_ids"),
    ("/v1/chat/completions", chat(response_format={"type": "json_object"}), "response_format"),
    ("/v1/completions", completion(logprobs=2), "logprobs"),
    ("/v1/chat/completions", chat(logprobs=True), "logprobs"),
    ("/v1/completions", completion(echo=True), "echo"),
    ("/v1/completions", completion(best_of=3), "best_of"),
    ("/v1/completions", completion(prompt=[5, 9999]), "prompt"),  # a token id outside the vocabulary
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p.split('/')[-1]}-{param}" for p, _, param in BAD])
def test_bad_input_gets_400_naming_the_field(base, path, body, param):
    r = post(base, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("_")[0] in error["message"]


def test_prompt_over_the_context_is_413(base):
    r = post(base, "/v1/completions", completion(prompt="x" * 600))  # the tiny context is 512 tokens
    assert r.status_code == 413 and r.json()["error"]["code"] == "context_length_exceeded"


def test_request_over_the_kv_budget_is_400(base):
    """torch rows hold their own prompt: 4 x (200 + 312) = 2048 KV tokens > max_live_tokens = 2000."""
    r = post(base, "/v1/completions", completion(prompt="x" * 200, n=4, max_tokens=400))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "2,048 tokens" in r.json()["error"]["message"]
    assert post(base, "/v1/completions", completion(prompt="x" * 200, n=3, max_tokens=400)).status_code == 200


def test_body_over_the_limit_is_413(base):
    big = completion(prompt=[65] * 8000)  # about 24 kB of JSON > max_body_bytes = 20 kB
    r = post(base, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunks = (b'{"prompt": "' + b"x" * 1000 for _ in range(25))  # no content-length: counted while read
    r = httpx.post(base + "/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "20,000" in r.json()["error"]["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(base):
    body = completion(min_tokens=0, repetition_penalty=1.0, presence_penalty=0, top_k=-1, seed=2**63 - 1,
                      logit_bias={}, user="someone")
    assert post(base, "/v1/completions", body).status_code == 200
    assert post(base, "/v1/chat/completions", chat(logprobs=False, response_format={"type": "text"})).status_code == 200


def test_every_neutral_field_is_undeclared():
    """check_unsupported reads only the undeclared fields: a declared one would slip past it."""
    assert not set(NEUTRAL) & set(CommonRequest.model_fields)


# ---- what is honoured ----------------------------------------------------------------------------------------


def test_default_max_tokens(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == LIMITS["default_max_tokens"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == LIMITS["default_max_tokens"]


def test_tiny_temperature_is_greedy(client):
    assert MIN_TEMPERATURE == 1e-3
    texts = [client.completions.create(model="tiny", prompt=PROMPT, temperature=t, max_tokens=24, seed=s).choices[0].text
             for t, s in ((0, None), (1e-5, 1), (1e-5, 2), (9e-4, 3))]
    assert len(set(texts)) == 1
    sampled = {client.completions.create(model="tiny", prompt=PROMPT, temperature=1.0, max_tokens=24, seed=s)
               .choices[0].text for s in range(4)}
    assert len(sampled) > 1  # the prompt is not one the model answers the same way whatever is sampled


def test_top_k_one_is_greedy(client):
    greedy = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=24).choices[0].text
    r = client.completions.create(model="tiny", prompt=PROMPT, temperature=1.5, max_tokens=24, n=4, seed=7,
                                  extra_body={"top_k": 1})
    assert [c.text for c in r.choices] == [greedy] * 4


def test_ignore_eos(client):
    """At T=1 some of 4 samples end on the end-of-sequence token (within a few seeds: which sample a seed gives
    depends on the trees, which the machine's cost grid sizes); with ignore_eos none does."""
    def ask(seed: int, **extra):
        return client.completions.create(model="tiny", prompt=PROMPT, temperature=1.0, max_tokens=200, n=4, seed=seed,
                                         extra_body=extra)

    assert any(any(c.finish_reason == "stop" for c in ask(seed).choices) for seed in range(1, 9))
    ignoring = ask(1, ignore_eos=True)
    assert all(c.finish_reason == "length" for c in ignoring.choices)
    assert ignoring.usage.completion_tokens == 4 * 200


# ---- the worker: rows live at once, tokenising off the loop ------------------------------------------------------


def test_rows_beyond_max_live_rows_wait(served, client):
    """Six n=4 requests held until all have arrived: 24 rows asked for, 8 decode at a time."""
    base, app = served
    worker = app.state.stand.worker
    step, peak, go = worker.engine.step, [0], threading.Event()

    def counted(cb):
        go.wait(30)
        peak[0] = max(peak[0], len(worker.engine.live) + len(worker.engine.waiting))
        return step(cb)

    def ask(i: int):
        return client.completions.create(model="tiny", prompt=f"{PROMPT} {i}", n=4, temperature=0.8, max_tokens=10,
                                         seed=i, extra_body={"ignore_eos": True})

    worker.engine.step = counted
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(ask, i) for i in range(6)]
            wait_until(lambda: len(worker.live) + worker.depth == 6, 30)
            go.set()
            results = [f.result() for f in futures]
    finally:
        go.set()
        worker.engine.step = step
    assert [r.usage.completion_tokens for r in results] == [40] * 6
    assert peak[0] == LIMITS["max_live_rows"]
    # the worker gives rows back at the end of the step that ended them, which a client may outrun on a busy machine
    wait_until(lambda: worker.rows == worker.tokens == 0 and not worker.live, 30)


def test_tokenising_runs_off_the_event_loop(served, client):
    base, app = served
    target = app.state.stand.target
    threads, encode = [], target.encode

    def slow_encode(prompt, chat=True):
        threads.append(threading.current_thread().name)
        time.sleep(1.5)
        return encode(prompt, chat)

    target.encode = slow_encode
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.completions.create, model="tiny", prompt=PROMPT, max_tokens=2)
            wait_until(lambda: threads, 10)
            t0 = time.monotonic()
            assert healthy(base)  # the loop answers while the prompt is being tokenised
            assert time.monotonic() - t0 < 1.0
            assert len(pending.result().choices) == 1
    finally:
        del target.encode
    assert threads[0].startswith("stand-tokenize")


# ---- startup: warnings, the worst case; configuration errors ------------------------------------------------------


def test_non_loopback_without_key_warns_and_worst_case_is_logged(model_dir, caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    assert startup_warnings(ServerConfig(host="0.0.0.0", api_key="k")) == []
    caplog.set_level(logging.INFO, logger="stand.server")
    with running(ServerConfig(model=model_dir, method="stand", host="0.0.0.0")) as (base, _):  # binds 127.0.0.1
        wait_until(lambda: healthy(base), 120)
    messages = [r.getMessage() for r in caplog.records if r.name == "stand.server"]
    assert any("0.0.0.0 (not loopback) without --api-key" in m for m in messages)
    assert any(m.startswith("worst case per request on tiny") for m in messages)


def test_serve_help_shows_the_worst_case():
    out = CliRunner().invoke(cli_app, ["serve", "--help"], terminal_width=200).output
    assert "worst case per request on SmolLM2-135M-Instruct" in " ".join(out.split())
    for flag in ("--max-tokens-limit", "--default-max-tokens", "--max-prompt-tokens", "--max-live-rows", "--max-n",
                 "--max-body-bytes", "--max-live-tokens"):
        assert flag in out


def test_config_errors():
    for bad in (dict(default_max_tokens=600, max_tokens_limit=500), dict(max_n=32, max_live_rows=16),
                dict(max_prompt_tokens=0), dict(max_body_bytes=-1)):
        with pytest.raises(StandError):
            ServerConfig(**bad).validate()
    r = CliRunner().invoke(cli_app, ["serve", "--max-n", "100", "--max-live-rows", "10"])
    assert r.exit_code == 2 and "max_n (100) is over max_live_rows (10)" in r.output


# ---- the memory arithmetic -------------------------------------------------------------------------------------


def test_kv_tokens_and_worst_case():
    shared = ModelShape("m", 1000, 100, 512, True, None, 5000, 2)  # llama.cpp: cells allocated at start
    padded = ModelShape("m", 1000, 100, 512, False, None, 5000, 0, kv_copies=3)  # torch
    assert kv_tokens([100], 4, 50, shared) == 100 + 4 * 50
    assert kv_tokens([100], 4, 50, padded) == 4 * 150
    assert kv_tokens([500], 2, 50, shared) == 500 + 2 * 12  # rows stop at the context
    w = worst_case(max_n=4, max_prompt_tokens=100, max_tokens=50, shape=shared)
    assert w.kv_tokens == 4 * 150  # four prompts of one row each: four tables, more than one prompt with four rows
    chunk = CHUNK_COPIES * 150 * 100 * 4  # a row (150 tokens) is shorter than one prefill chunk
    logits = PASS_COPIES * (4 + STEP_TOKENS) * 100 * 4
    assert (w.kv, w.prompt_probs, w.pass_bytes, w.tables) == (0, 4 * 100 * (16 * 2 + 8), chunk + logits, 4 * 5000)
    assert worst_case(4, 100, 50, padded).kv == 3 * 4 * (150 + STEP_TOKENS) * 1000  # padded rows, three copies
    assert worst_case(4, 100, 50, padded).prompt_probs == 0
    assert worst_case(4, 100, 50, padded, shared_table=True).tables == 0


def test_rows_with_own_tables_count_them():
    from stand.server.memory import Need, footprint, row_table_bytes

    own = make_drafter(SpecConfig(method="stand", options={"own_latest": True, "own_capacity": 64}), 259)
    assert row_table_bytes(own) > 0 and row_table_bytes(make_drafter(SpecConfig(method="stand", options={
        "own_latest": False}), 259)) == 0
    shape = ModelShape("m", 100, 1000, 4096, False, None, 5000, 0, row_table_bytes=700)
    needs = [Need(rows=3, longest=10, kv_tokens=30, prompt_positions=0, groups=1)]
    assert footprint(needs, shape).tables == 5000 + 3 * 700
    assert footprint(needs, shape, shared_table=True).tables == 3 * 700


def test_table_bytes_bounds_a_full_table():
    drafter = make_drafter(SpecConfig(method="stand", options={"capacity": 96}), 259)
    n = drafter.options.max_n
    table = NGramTable(n, drafter.options.topk, 96)
    tails = np.array([[i] * (n - 1) + [100 + i] for i in range(96 // n)])  # contexts x n suffix keys fill 96 slots
    table.insert(tails, np.ones((len(tails), 1), dtype=np.int64), np.ones((len(tails), 1)))
    assert n == 6 and len(table) == 96
    assert 0.9 * table_bytes(drafter) <= table.memory_bytes() <= table_bytes(drafter)
    assert table_bytes(make_drafter(SpecConfig(method="pld"), 259)) == 0


@pytest.mark.slow
def test_default_shape_is_the_default_model():
    from extras import require

    from stand.backends.load import load_model

    require("llama_cpp")

    target = load_model(None, backend="llama.cpp")  # the shape DEFAULT_SHAPE describes
    drafter = make_drafter(SpecConfig(method="stand"), target.vocab_size, target)
    assert dataclasses.replace(shape_of(target, drafter, ServerConfig()), name=DEFAULT_SHAPE.name) == DEFAULT_SHAPE
