"""A server that survives its users: bad input gets a well-formed error naming what was wrong, one bad request or
one failing step harms no other, the configuration is checked before listening, nothing leaks across users.
The real uvicorn server on 127.0.0.1, the tiny model."""

from __future__ import annotations

import json

import httpx
import pytest

from stand.server import ServerConfig
from tiny import save_tiny
from test_server import healthy, running, wait_until

PROMPT = "Tell me a story about a cat."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def served(model_dir):
    with running(ServerConfig(model=model_dir, method="stand", max_n=4, max_live_rows=8)) as (base, app):
        wait_until(lambda: healthy(base), 120)
        yield base, app


@pytest.fixture(scope="module")
def base(served):
    return served[0]


def post(base: str, path: str, body: dict | None = None, **kw) -> httpx.Response:
    """body as ASCII JSON (a lone surrogate goes as its escape, "\\ud800", as a client's JSON encoder sends it)."""
    return httpx.post(base + path, content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw)


def openai_error(r: httpx.Response, status: int) -> dict:
    """The error of a response that must be OpenAI's shape with this status."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---- finding 9: error shapes ----------------------------------------------------------------------------------------

BAD_TEXT = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}, 3]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": 5, "content": "hi"}]}, "messages"),
    ("/v1/completions", {"prompt": "a\udfffb"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "x\ud800"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, "stop"),
]


@pytest.mark.parametrize("path,body,param", BAD_TEXT, ids=[str(i) for i in range(len(BAD_TEXT))])
def test_error_shapes_bad_text_is_400_json(base, path, body, param):
    error = openai_error(post(base, path, {"max_tokens": 2, **body}), 400)
    assert error["param"] == param


def test_error_shapes_unexpected_exception_is_json_500_without_details(served):
    """A bug in a route (here: the tokenizer raises) answers 500 in OpenAI's shape, without the exception's text."""
    base, app = served
    target = app.state.stand.target
    target.encode = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("secret /home/someone/path"))
    try:
        error = openai_error(post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2}), 500)
    finally:
        del target.encode
    assert "secret" not in error["message"] and error["type"] == "server_error"
    assert healthy(base)
