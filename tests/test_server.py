"""The OpenAI-compatible server: the real uvicorn server on a loopback port, the tiny model, the official client."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from stand.api import generate
from stand.backends.load import load_model
from stand.params import SamplingParams, SpecConfig
from stand.server import ServerConfig, TextStream, create_app
from tiny import byte_tokenizer, save_tiny

KEY = "test-key"
PROMPT = "Tell me a story about a cat."


@contextlib.contextmanager
def running(config: ServerConfig, loader=None):
    """The app served by uvicorn in a thread on a free 127.0.0.1 port; yields (base url, app)."""
    app = create_app(config, loader)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        wait_until(lambda: server.started, 30)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_until(cond, timeout: float, every: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(every)


def healthy(base: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(base + "/health", timeout=5).status_code == 200
    return False


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def served(model_dir):
    config = ServerConfig(model=model_dir, method="stand", api_key=KEY)
    with running(config) as (base, app):
        wait_until(lambda: healthy(base), 60)
        yield base, app


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


# ---- the stable-text stream (no server) ----------------------------------------------------------------


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.update(ids[:k], done=k == len(ids)) for k in range(1, len(ids) + 1)]


def test_text_stream_holds_back_partial_characters():
    tok = byte_tokenizer()
    text = "aé€😀b"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    deltas = feed(TextStream(tok.decode, []), ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_text_stream_never_sends_a_stop_string():
    tok = byte_tokenizer()
    ids = tok.encode("abcSTOPdef")
    deltas = feed(TextStream(tok.decode, ["STOP"]), ids)
    assert "".join(deltas) == "abc"
    assert not any("S" in d for d in deltas)


# ---- the server ---------------------------------------------------------------------------------------------


def test_health_models_metrics(server, client, model_dir):
    assert httpx.get(server + "/health").json()["status"] == "ok"  # no key needed
    assert [m.id for m in client.models.list().data] == [os.path.basename(model_dir)]
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("stand_requests_total", "stand_completion_tokens_total", "stand_mean_accepted_tokens",
                 "stand_drafting_seconds_total"):
        assert f"# TYPE {name}" in text


def test_greedy_text_equals_generate(server, client, model_dir):
    target = load_model(model_dir)  # the server's own (cached) Target
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                          temperature=0, max_tokens=12)
    plain = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=12)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    want_chat = generate(PROMPT, model=target, params=greedy, spec=SpecConfig(method="none"))[0][0]
    want_plain = generate(PROMPT, model=target, params=greedy, spec=SpecConfig(method="none"), chat=False)[0][0]
    assert chat.choices[0].message.content == want_chat.text
    assert plain.choices[0].text == want_plain.text
    assert chat.usage.completion_tokens == len(want_chat.token_ids)
    assert chat.usage.prompt_tokens == len(target.encode(PROMPT))
    assert plain.usage.prompt_tokens == len(target.encode(PROMPT, chat=False))


def test_completion_n4_sampled(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, n=4, temperature=0.8, top_p=0.9, seed=3,
                                  max_tokens=8, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 4 * 8
    again = client.completions.create(model="tiny", prompt=PROMPT, n=4, temperature=0.8, top_p=0.9, seed=3,
                                      max_tokens=8, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible


def test_chat_stream_n4_every_choice(server, client):
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                           n=4, temperature=0, max_tokens=10)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                            n=4, temperature=0, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    texts, finish, usage = {}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert sorted(texts) == sorted(finish) == [0, 1, 2, 3]
    assert [texts[i] for i in range(4)] == [c.message.content for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_raw_sse_ends_with_done(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "n": 2, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}


def test_stop_string(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=12).choices[0].text
    stop = full[5:7]
    want = full[: full.find(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=12, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    streamed = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=12, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_invalid_parameters_and_key(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, temperature=3.5, max_tokens=4)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=PROMPT, n=0, max_tokens=4)
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="x" * 600, max_tokens=4)  # the tiny context is 512
    assert e.value.status_code == 413 and e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_sixteen_concurrent_requests(served, client):
    server, app = served
    steps, step_rows = metric(server, "stand_engine_steps_total"), metric(server, "stand_step_rows_total")
    rows = metric(server, "stand_admitted_rows_total")

    def ask(i: int):
        n = 1 + i % 4
        r = client.completions.create(model="tiny", prompt=f"{PROMPT} {i}", n=n, temperature=0.7, max_tokens=6,
                                      extra_body={"ignore_eos": True})
        return n, r

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16)))
    for n, r in results:
        assert sorted(c.index for c in r.choices) == list(range(n))
        assert r.usage.completion_tokens == 6 * n
    assert metric(server, "stand_admitted_rows_total") - rows == sum(n for n, _ in results)
    rows_per_step = (metric(server, "stand_step_rows_total") - step_rows) / (metric(server, "stand_engine_steps_total") - steps)
    assert rows_per_step > 2  # requests that arrived together decoded together
    assert metric(server, "stand_live_rows") == 0
    assert not app.state.stand.drafter.tables  # per-request tables are freed when their rows finish


def test_cancelled_stream_frees_its_rows(server, client):
    cancelled = metric(server, "stand_cancelled_rows_total")
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "temperature": 0.7, "n": 2, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        for _ in zip(range(3), r.iter_lines()):
            pass
    wait_until(lambda: metric(server, "stand_cancelled_rows_total") >= cancelled + 2, 30, every=0.2)
    assert healthy(server)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    assert len(r.choices) == 1


def test_loading_503_queue_429_and_table_saved(model_dir, tmp_path):
    """A server whose model load waits: 503; then an engine held at a gate with max_queue=1: 429."""
    loaded, gate = threading.Event(), threading.Event()
    table = tmp_path / "table.bin"
    config = ServerConfig(model=model_dir, method="stand", max_queue=1, table=str(table))
    with running(config, loader=lambda: (loaded.wait(30), load_model(model_dir))[1]) as (base, app):
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert httpx.get(base + "/health").status_code == 503
        loaded.set()
        wait_until(lambda: healthy(base), 30)
        worker = app.state.stand.worker
        step = worker.engine.step
        worker.engine.step = lambda cb: (gate.wait(30), step(cb))[1]
        body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, base + "/v1/completions", json=body, timeout=60)
            wait_until(lambda: worker.live, 10)  # the worker holds the first request at the gate
            second = pool.submit(httpx.post, base + "/v1/completions", json=body, timeout=60)
            wait_until(lambda: worker.depth == 1, 10)  # the second waits in the queue
            third = httpx.post(base + "/v1/completions", json=body, timeout=60)
            gate.set()
            assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
            assert first.result().status_code == second.result().status_code == 200
        assert list(app.state.stand.drafter.tables) == ["shared"]  # one table for every request
    assert table.exists()  # the shared table was saved
