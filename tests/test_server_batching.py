"""Continuous batching in `stand serve`: a short request sent while a long one decodes joins it at the next
step and comes back first; a request cancelled while it waits for room never runs. The official client
against the real uvicorn server on 127.0.0.1; the tiny model, and (slow) the default one."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from stand.server import ServerConfig
from tiny import save_tiny
from test_server import healthy, metric, running, wait_until

PROMPT = "Tell me a story about a cat."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = save_tiny(str(tmp_path_factory.mktemp("tiny")))
    # float32 pinned: the greedy text is compared alone and beside other rows (see test_server_faults.py)
    config = ServerConfig(model=model_dir, method="stand", dtype="float32", api_key="test-key", max_n=4,
                          max_live_rows=8)
    with running(config) as (base, app):
        wait_until(lambda: healthy(base), 120)
        yield base, app


@pytest.fixture
def slow_steps(served):
    """Every engine step takes at least 20 ms more: the tiny model's long requests last seconds."""
    worker = served[1].state.stand.worker
    step = worker.engine.step
    worker.engine.step = lambda cb: (time.sleep(0.02), step(cb))[1]
    yield worker
    worker.engine.step = step


def stream_long(client: openai.OpenAI, tokens: int, seen: list, model: str = "tiny", chat: bool = False) -> float:
    """Streams a long request (ignore_eos: exactly `tokens` tokens); notes each piece; returns when it ended."""
    kw = dict(model=model, max_tokens=tokens, temperature=0.7, seed=0, stream=True, extra_body={"ignore_eos": True})
    if chat:
        stream = client.chat.completions.create(messages=[{"role": "user", "content": PROMPT}], **kw)
    else:
        stream = client.completions.create(prompt=PROMPT, **kw)
    for chunk in stream:
        if chunk.choices:
            seen.append(chunk.choices[0].delta.content if chat else chunk.choices[0].text)
    return time.monotonic()


def short_overtakes_long(client: openai.OpenAI, long_tokens: int, model: str, chat: bool) -> tuple[float, float, float]:
    """While a long request streams, a 4-token one: (its latency, when it ended, when the long one ended)."""
    seen: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(stream_long, client, long_tokens, seen, model, chat)
        wait_until(lambda: len(seen) >= 3 or long.done(), 120)  # the long one is decoding
        t0 = time.monotonic()
        if chat:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                               temperature=0, extra_body={"ignore_eos": True})
        else:
            r = client.completions.create(model=model, prompt="Hi", max_tokens=4, temperature=0,
                                          extra_body={"ignore_eos": True})
        short_end = time.monotonic()
        assert r.usage.completion_tokens == 4
        return short_end - t0, short_end, long.result()


def test_short_request_overtakes_a_long_one(served, slow_steps):
    base, _ = served
    client = openai.OpenAI(base_url=base + "/v1", api_key="test-key", max_retries=0, timeout=60)
    alone = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    latency, short_end, long_end = short_overtakes_long(client, 300, "tiny", chat=False)
    assert short_end < long_end  # it joined the running batch instead of waiting for the long one's end
    assert latency < 3.0
    again = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    assert again == alone  # greedy text is the same alone or beside another row


def test_request_cancelled_while_waiting_never_runs(served, slow_steps):
    """Two n=4 requests fill the 8 live rows; a third waits; its client goes away; it is dropped unrun."""
    base, app = served
    worker = slow_steps
    client = openai.OpenAI(base_url=base + "/v1", api_key="test-key", max_retries=0, timeout=60)
    admitted, cancelled = metric(base, "stand_admitted_rows_total"), metric(base, "stand_cancelled_rows_total")

    def fill(i: int):
        return client.completions.create(model="tiny", prompt=PROMPT, n=4, max_tokens=150, temperature=0.7, seed=i,
                                         extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(2) as pool:
        full = [pool.submit(fill, i) for i in range(2)]
        wait_until(lambda: worker.rows == 8, 30)
        body = {"prompt": PROMPT, "max_tokens": 60, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer test-key"}) as r:
            wait_until(lambda: worker.depth == 1, 10)  # it waits for room
        assert [f.result().usage.completion_tokens for f in full] == [600, 600]
    wait_until(lambda: worker.depth == 0 and not worker.live, 30)
    assert r.status_code == 200
    assert metric(base, "stand_admitted_rows_total") - admitted == 8  # the third never joined
    assert metric(base, "stand_cancelled_rows_total") - cancelled == 1


@pytest.mark.slow
def test_short_request_overtakes_a_long_one_on_the_default_model():
    """The default model: a 4-token chat request sent while a 300-token one decodes is back in under 3 s."""
    with running(ServerConfig()) as (base, app):
        wait_until(lambda: healthy(base) or app.state.stand.load_error, 600)
        assert not app.state.stand.load_error
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        latency, short_end, long_end = short_overtakes_long(client, 300, "default", chat=True)
    assert short_end < long_end
    assert latency < 3.0
