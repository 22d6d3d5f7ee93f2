"""A server that survives its users: bad input gets a well-formed error naming what was wrong, one bad request or
one failing step harms no other, the configuration is checked before listening, nothing leaks across users.
The real uvicorn server on 127.0.0.1, the tiny model."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from typer.testing import CliRunner

from stand.cli import app as cli_app
from stand.drafters.ngram_table import NGramTable
from stand.drafters.stand import StandOptions
from stand.errors import StandError
from stand.server import ServerConfig
from stand.server.memory import STEP_TOKENS, MemoryBudget, ModelShape, footprint, free_bytes, need_of
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


def metric_of(base: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", httpx.get(base + "/metrics").text, re.M).group(1))


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
    state, drafter = app.state.stand, app.state.stand.drafter
    state.drafter = type("Broken", (), {"__getattr__": lambda self, name: 1 / 0})()
    try:
        with httpx.Client(base_url=base, timeout=60) as client:  # one connection: it survives the error
            assert [openai_error(client.get("/metrics"), 500)["code"] for _ in range(2)] == ["internal_error"] * 2
    finally:
        state.drafter = drafter
    assert healthy(base)


# ---- finding 10: configuration ---------------------------------------------------------------------------------


def test_configuration_max_queue_zero_is_refused_at_start():
    with pytest.raises(StandError, match="max_queue must be >= 1"):
        ServerConfig(max_queue=0).validate()
    r = CliRunner().invoke(cli_app, ["serve", "--max-queue", "0"])
    assert r.exit_code == 2 and "max_queue must be >= 1" in r.output


def test_configuration_non_gguf_model_exits_2(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    r = CliRunner().invoke(cli_app, ["serve", "--model", str(fake), "--port", "0"])
    assert r.exit_code == 2 and "is not a GGUF file" in r.output, r.output


def test_configuration_foreign_table_exits_2(tmp_path):
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes")
    r = CliRunner().invoke(cli_app, ["serve", "--table", str(foreign), "--port", "0"])
    assert r.exit_code == 2 and "is not a stand n-gram table" in r.output, r.output
    assert foreign.read_text() == "my notes"


def test_configuration_table_for_another_model_exits_2(model_dir, tmp_path):
    """Found only once the model is loaded (the table's vocabulary is not the model's): the server stops, exit 2."""
    table = tmp_path / "table.bin"
    options = StandOptions()  # the run's own max_n and topk: only the vocabulary differs
    NGramTable(options.max_n, options.topk, 64).save(str(table), meta={"vocab_size": 1000})
    r = CliRunner().invoke(cli_app, ["serve", "--model", model_dir, "--table", str(table), "--port", "0"])
    assert r.exit_code == 2 and "vocabulary of 1000 tokens" in r.output, r.output


def test_configuration_rows_over_llamacpp_sequences_refused_at_start():
    with pytest.raises(StandError, match="over what llama.cpp holds at most .256"):
        ServerConfig(max_live_rows=300, backend="llama.cpp").validate()
    ServerConfig(max_live_rows=300, backend="torch").validate()


# ---- finding 8: privacy and auth -----------------------------------------------------------------------------------


def test_privacy_shared_table_file_is_private_and_stats_stay_home(model_dir, tmp_path):
    table = tmp_path / "table.bin"
    with running(ServerConfig(model=model_dir, method="stand", table=str(table))) as (base, _):
        wait_until(lambda: healthy(base), 120)
        r = post(base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 200 and "stand" not in r.json()  # acceptance would tell of other users' text
    assert stat.S_IMODE(os.stat(table).st_mode) == 0o600


def test_privacy_stats_shown_without_a_shared_table(base):
    assert "mean_accepted" in post(base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4}).json()["stand"]


def test_auth_vllm_launcher_keeps_the_key_off_the_command_line(model_dir, monkeypatch, capsys):
    from stand.integrations.vllm import launch

    seen = {}
    monkeypatch.setenv("STAND_VLLM_PYTHON", sys.executable)
    monkeypatch.setattr(launch.os, "execve", lambda path, cmd, env: seen.update(cmd=cmd, env=env))
    launch.serve_vllm(model_dir, "stand", "127.0.0.1", 8000, "float32", api_key="s3cret")
    assert not any("s3cret" in c for c in seen["cmd"]) and "s3cret" not in capsys.readouterr().err
    assert seen["env"]["VLLM_API_KEY"] == "s3cret"


def test_auth_non_ascii_key_matches(model_dir):
    key = "clé-ключ"
    with running(ServerConfig(model=model_dir, method="none", api_key=key)) as (base, _):
        wait_until(lambda: healthy(base), 120)
        ok = httpx.get(base + "/v1/models", headers={"Authorization": b"Bearer " + key.encode()})
        wrong = httpx.get(base + "/v1/models", headers={"Authorization": b"Bearer " + "clé-ключи".encode()})
    assert ok.status_code == 200 and wrong.status_code == 401


def test_auth_health_hides_the_load_error(tmp_path):
    secret = str(tmp_path / "private-dir")

    def fail():
        raise RuntimeError(f"cannot open {secret}/weights")

    with running(ServerConfig(method="none"), loader=fail) as (base, app):
        wait_until(lambda: app.state.stand.load_error, 30)
        for r in (httpx.get(base + "/health"), post(base, "/v1/completions", {"prompt": "hi"})):
            assert openai_error(r, 503)["code"] == "model_load_failed" and secret not in r.text


def test_auth_host_header_checked_on_a_keyless_loopback_server(base):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    port = base.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example"):
        assert openai_error(httpx.get(base + "/v1/models", headers={"Host": host}), 403)["code"] == "bad_host"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(base + "/v1/models", headers={"Host": host}).status_code == 200


# ---- finding 4: work before the queue ------------------------------------------------------------------------------


def test_work_before_the_queue_huge_prompt_refused_untokenized(served):
    """A prompt too long in bytes for max_prompt_tokens is refused without tokenising it."""
    base, app = served
    target, calls = app.state.stand.target, []
    encode = target.encode
    target.encode = lambda *a, **k: (calls.append(1), encode(*a, **k))[1]
    try:
        for path, body in (("/v1/completions", {"prompt": "x" * 900_000}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 900_000}]})):
            error = openai_error(post(base, path, {**body, "max_tokens": 2}), 400)
            assert error["param"] in ("prompt", "messages") and "4,096" in error["message"]
        assert openai_error(post(base, "/v1/completions", {"prompt": [5] * 5000, "max_tokens": 2}), 400)["param"] == "prompt"
    finally:
        del target.encode
    assert not calls


def test_work_before_the_queue_tokenizing_requests_count(model_dir):
    """max_queue=2: with the tokenizer held, two requests wait for it and a third gets 429 at once."""
    gate, started = threading.Event(), []
    with running(ServerConfig(model=model_dir, method="none", max_queue=2)) as (base, app):
        wait_until(lambda: healthy(base), 120)
        target = app.state.stand.target
        encode = target.encode
        target.encode = lambda *a, **k: (started.append(1), gate.wait(30), encode(*a, **k))[2]
        try:
            with ThreadPoolExecutor(2) as pool:
                held = [pool.submit(post, base, "/v1/completions", {"prompt": f"hi {i}", "max_tokens": 2})
                        for i in range(2)]
                wait_until(lambda: started and app.state.stand.waiting == 2, 10)
                third = post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
                gate.set()
                assert [f.result().status_code for f in held] == [200, 200]
        finally:
            gate.set()
            del target.encode
    assert openai_error(third, 429)["code"] == "queue_full"


# ---- finding 5: shared drafter state ---------------------------------------------------------------------------------


def test_shared_drafter_state_table_saved_by_the_worker_after_its_last_step(model_dir, tmp_path):
    """--table: going idle saves nothing (a save there stalled the next request); shutdown saves once, on the
    engine's thread after its last step (never while a step may still run)."""
    table, events = tmp_path / "table.bin", []
    with running(ServerConfig(model=model_dir, method="stand", table=str(table))) as (base, app):
        wait_until(lambda: healthy(base), 120)
        drafter, worker = app.state.stand.drafter, app.state.stand.worker
        save, step = drafter.save_table, worker.engine.step
        drafter.save_table = lambda *a: (events.append(("save", threading.current_thread().name)), save(*a))[1]
        worker.engine.step = lambda cb: (events.append(("step",)), step(cb))[1]
        for i in range(3):
            assert post(base, "/v1/completions", {"prompt": f"{PROMPT} {i}", "max_tokens": 3}).status_code == 200
            wait_until(lambda: not worker.engine.busy, 10)
        assert not [e for e in events if e[0] == "save"]
    assert [e for e in events if e[0] == "save"] == [("save", "stand-engine")] and events[-1][0] == "save"
    assert table.exists()


# ---- finding 1: a memory budget on every backend -----------------------------------------------------------------


def test_memory_budget_counts_padding_and_copies():
    """On torch every row is padded to the longest and the lean cache is copied up to four times while rows join;
    llama.cpp's cells are allocated at start and bounded by their count."""
    torch_shape = ModelShape("t", 1000, 100, 4096, False, None, 0, 0, kv_copies=4, heads=2, grow_slots=256)
    short, long = need_of([50], 4, 50, torch_shape), need_of([1000], 1, 1000, torch_shape)
    both = footprint([short, long], torch_shape)
    assert both.kv == 4 * 5 * (2000 + STEP_TOKENS + 256) * 1000  # 5 rows, each as long as the longest
    assert both.kv > footprint([short], torch_shape).kv + footprint([long], torch_shape).kv
    llama = ModelShape("l", 1000, 100, 4096, True, 3000, 5000, 0)
    assert footprint([need_of([100], 4, 50, llama)], llama).kv == 0
    budget = MemoryBudget(llama, limit=1 << 40)
    assert budget.fits([need_of([100], 4, 50, llama)]) and "3,000 for all requests" in budget.over(
        [need_of([1000], 4, 501, llama)])
    assert footprint([need_of([10], 1, 5, llama)] * 3, llama).tables == 3 * 5000
    assert footprint([need_of([10], 1, 5, llama)] * 3, llama, shared_table=True).tables == 0


class TensorBytes(TorchDispatchMode):
    """Within: the bytes of every tensor storage that torch ops made and that is still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors on it]
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), [storage.nbytes(), 0])[1] += 1
                weakref.finalize(t, self._drop, storage.data_ptr())
        self.peak = max(self.peak, sum(b for b, _ in self.live.values()))
        return out

    def _drop(self, address: int) -> None:
        entry = self.live.get(address)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self.live[address]


def test_memory_budget_bounds_what_torch_allocates_as_it_runs(tiny):
    """Every tensor the engine makes on the lean torch backend (the padded cache, its copies while rows join,
    the passes' logits and attention), at its peak, stays within the footprint of the rows decoding, through
    admissions of rows of different lengths while others decode."""
    from stand.backends.lean import LeanTarget
    from stand.core.sequence import Row
    from stand.drafters.none import NoDrafter
    from stand.engine import Engine
    from stand.params import SamplingParams, SpecConfig
    from stand.server.memory import shape_of

    target = LeanTarget.from_target(tiny)
    shape = shape_of(target, NoDrafter(SpecConfig(), tiny.vocab_size), ServerConfig())
    engine = Engine(target, NoDrafter(SpecConfig(), tiny.vocab_size))
    jobs = [([5] * 20, 4, 200, 190), ([6] * 100, 1, 50, 20), ([7] * 40, 2, 10, 0)]  # prompt, n, new, steps after
    largest = 0  # the cache's own bytes between steps
    with TensorBytes() as seen:
        for prompt, n, new, steps in jobs:  # each joins while the others decode, the first near its end
            engine.add([Row(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True)) for _ in range(n)])
            for _ in range(steps + 1):
                engine.step()
                largest = max(largest, engine.cache.inner.kv.nbytes if engine.live else 0)
        while engine.busy:
            engine.step()
    fp = footprint([need_of([len(p)], n, new, shape) for p, n, new, _ in jobs], shape)
    assert 2 * largest < seen.peak <= fp.total  # over two copies of the padded cache at once, within the footprint


@pytest.fixture(scope="module")
def small_budget(model_dir):
    """A server whose requests share 100 MiB: a request of one prompt (its 67 MiB n-gram table, 2.1 MiB a sample of its
    own, its KV, its passes) fits, two do not fit together, and one of three prompts (three tables) never fits."""
    config = ServerConfig(model=model_dir, method="stand", max_n=16, max_live_rows=32, memory_budget_mib=100,
                          max_tokens_limit=500, default_max_tokens=20)
    with running(config) as (base, app):
        wait_until(lambda: healthy(base), 120)
        yield base, app


def test_memory_budget_request_that_never_fits_gets_400_with_the_numbers(small_budget):
    base, app = small_budget
    r = post(base, "/v1/completions", {"prompt": ["x" * 8, "y" * 8, "z" * 8], "n": 2, "max_tokens": 20})
    error = openai_error(r, 400)
    tables = "drafter tables 213 MiB"  # three prompts' tables of 67 MiB and six samples' own of 2.1 MiB
    assert error["param"] == "max_tokens" and "100 MiB" in error["message"] and tables in error["message"]
    assert post(base, "/v1/completions", {"prompt": "x" * 8, "n": 4, "max_tokens": 20}).status_code == 200


def test_memory_budget_request_that_fits_later_waits(small_budget):
    base, app = small_budget
    worker, state = app.state.stand.worker, app.state.stand
    step, peak = worker.engine.step, [0]
    worker.engine.step = lambda cb: (peak.__setitem__(0, max(peak[0], state.metrics.memory_reserved)), step(cb))[1]
    body = {"prompt": "y" * 8, "n": 4, "max_tokens": 400, "temperature": 0.7, "ignore_eos": True}
    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda i: post(base, "/v1/completions", {**body, "seed": i}), range(3)))
    finally:
        worker.engine.step = step
    assert [r.status_code for r in results] == [200] * 3
    assert 64 << 20 < peak[0] <= 100 << 20  # one at a time: two would be over the budget
    assert metric_of(base, "stand_memory_budget_bytes") > 100 << 20  # the server's own memory, plus the budget


def test_memory_budget_default_from_free_memory_in_the_startup_line(model_dir, caplog):
    caplog.set_level(logging.INFO, logger="stand.server")
    with running(ServerConfig(model=model_dir, method="none")) as (base, app):
        wait_until(lambda: healthy(base), 120)
        limit = app.state.stand.budget.limit
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory budget"))
    assert f"requests may take {limit / 2**20:,.0f} MiB" in line and "80% of the" in line and "free at start" in line
    assert 0 < limit < free_bytes()
