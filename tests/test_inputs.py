"""Bad input found by users: one clear line (CLI: exit 2, no traceback), and nothing already produced is lost."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from stand.backends.load import load_model
from stand.cli import app
from stand.drafters.ngram_table import FORMAT_VERSION, MAGIC, NGramTable
from stand.drafters.registry import make_drafter
from stand.errors import StandError
from stand.params import SamplingParams, SpecConfig
from tiny import byte_tokenizer, save_tiny, save_tiny_gguf
from stand.tts.problems import jsonl

HAS_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


def run_cli(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    return result


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


# ---- sampling parameters ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    ({"seed": -1}, "seed must be an integer in [0, 2^63)"),
    ({"seed": 2**63}, "seed must be an integer in [0, 2^63)"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"temperature": 1e-45}, "temperature must be 0 (greedy) or at least 0.001"),
    ({"temperature": 5e-4}, "temperature must be 0 (greedy) or at least 0.001"),
    ({"temperature": float("nan")}, "temperature must be >= 0 and finite"),
    ({"temperature": float("inf")}, "temperature must be >= 0 and finite"),
    ({"top_p": float("nan")}, "top_p must be in (0, 1]"),
])
def test_sampling_params_refused(kw, message):
    with pytest.raises(StandError, match=message.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^")
                       .replace("[", r"\[")):
        SamplingParams(**kw).validate()


def test_sampling_params_edges_accepted():
    SamplingParams(temperature=1e-3, seed=0).validate()
    SamplingParams(temperature=0.0, seed=2**63 - 1).validate()
    SamplingParams(seed=np.int64(7)).validate()


# ---- model files -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_dir):
    """A tiny HF directory whose safetensors keep their first 1000 bytes (and one cut in half), and a tiny GGUF
    cut to 1000 bytes (and one cut in half)."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name, keep in (("st_1000", lambda n: 1000), ("st_half", lambda n: n // 2)):
        d = root / name
        shutil.copytree(tiny_dir, d)
        raw = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(raw[:keep(len(raw))])
        out[name] = str(d)
    whole = (root / "whole.gguf").as_posix()
    raw = open(save_tiny_gguf(whole), "rb").read()
    for name, size in (("gguf_1000", 1000), ("gguf_half", len(raw) // 2)):
        (root / f"{name}.gguf").write_bytes(raw[:size])
        out[name] = str(root / f"{name}.gguf")
    return out


@pytest.mark.parametrize("name,backend", [("st_1000", "torch"), ("st_half", "torch"), ("gguf_1000", "torch"),
                                          ("gguf_half", "torch"), ("gguf_1000", "auto"), ("gguf_half", "auto")])
def test_truncated_model_file_is_one_error(broken_models, name, backend):
    with pytest.raises(StandError, match="could not load .*truncated or damaged") as e:
        load_model(broken_models[name], "float32", backend)
    assert broken_models[name] in str(e.value) and "\n" not in str(e.value)


def test_truncated_model_on_the_command_line(broken_models):
    for name in ("st_1000", "gguf_1000"):
        line = one_error_line(run_cli(["generate", "hi", "--model", broken_models[name]]))
        assert "could not load" in line and broken_models[name] in line


@pytest.mark.skipif(not HAS_LLAMACPP, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("name", ["gguf_1000", "gguf_half"])
def test_llamacpp_refuses_a_truncated_gguf(broken_models, name):
    """llama.cpp itself (past the tokenizer, which transformers reads) returns no model: a StandError."""
    from stand.backends.llamacpp import LlamaCppModel

    with pytest.raises(StandError, match="llama.cpp could not load"):
        LlamaCppModel(broken_models[name], byte_tokenizer())


# ---- JSONL prompts ---------------------------------------------------------------------------------

def test_jsonl_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "one"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(StandError, match=r"line 2: not UTF-8 text \(byte 0xe9"):
        jsonl(str(path))
    line = one_error_line(run_cli(["solve", "--jsonl", str(path), "--n", "1"]))
    assert "line 2: not UTF-8" in line


def test_jsonl_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes('\ufeff{"prompt": "one", "answer": 1}\n'.encode("utf-8"))
    assert [(p.prompt, p.answer) for p in jsonl(str(path))] == [("one", "1")]


# ---- --table PATH ----------------------------------------------------------------------------------

def _sample_table(vocab=259) -> NGramTable:
    t = NGramTable(max_n=4, topk=10, capacity=256)
    t.insert([[-1, -1, 1, 2]], [[3, 4, 5]], [[0.5, 0.3, 0.1]])
    return t


@pytest.mark.parametrize("content,what", [(b"my notes\n", "it is text starting with 'my notes'"),
                                          (b'{"a": 1}', "it is JSON"), (b"GGUF\x03\x00", "a GGUF model file"),
                                          (b"\x00\x01\x02\xff", "binary data")])
def test_table_path_that_is_another_file_is_refused_before_generating(tmp_path, content, what):
    path = tmp_path / "precious.txt"
    path.write_bytes(content)
    result = run_cli(["generate", "hi", "--model", "/no/such/model", "--method", "stand", "--table", str(path)])
    line = one_error_line(result)  # refused before the (missing) model is even looked at
    assert "is not a stand n-gram table" in line and what in line
    assert path.read_bytes() == content


def test_table_path_that_is_a_directory_is_refused_before_generating(tmp_path):
    line = one_error_line(run_cli(["generate", "hi", "--model", "/no/such/model", "--method", "stand",
                                   "--table", str(tmp_path)]))
    assert "is a directory" in line
    line = one_error_line(run_cli(["solve", "q", "--model", "/no/such/model", "--method", "stand",
                                   "--table", str(tmp_path)]))
    assert "is a directory" in line


def test_json_path_that_is_a_directory_is_refused_first(tmp_path):
    line = one_error_line(run_cli(["solve", "q", "--model", "/no/such/model", "--json", str(tmp_path)]))
    assert "--json" in line and "is a directory" in line


def test_api_checks_the_table_path_when_the_drafter_opens_it(tiny, tmp_path):
    from stand.api import generate

    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for path, message in ((tmp_path, "is a directory"), (notes, "is not a stand n-gram table")):
        spec = SpecConfig(method="stand", table_path=str(path))
        with pytest.raises(StandError, match=message):
            make_drafter(spec, tiny.vocab_size)
        with pytest.raises(StandError, match=message):
            generate("hi", tiny, params=SamplingParams(max_new_tokens=4), spec=spec)
    assert notes.read_text() == "keep me"


def test_table_of_another_model_is_refused_not_overwritten(tiny, tmp_path):
    path = tmp_path / "t.ngt"
    _sample_table().save(str(path), meta={"vocab_size": 50000})
    before = path.read_bytes()
    with pytest.raises(StandError, match="built for a vocabulary of 50000 tokens, this model has 259"):
        make_drafter(SpecConfig(method="stand", table_path=str(path), options={"max_n": 4}), tiny.vocab_size)
    with pytest.raises(StandError, match="max_n=4, topk=10; this run uses max_n=6"):  # the default, since 2026-12-06
        make_drafter(SpecConfig(method="stand", table_path=str(path)), 50000)
    with pytest.raises(StandError, match="max_n=4, topk=10; this run uses max_n=2"):
        make_drafter(SpecConfig(method="stand", table_path=str(path), options={"max_n": 2}), 50000)
    assert path.read_bytes() == before


def test_empty_file_is_a_fresh_table(tiny, tmp_path):
    """An empty file (mktemp) holds nothing to lose: the run starts a table there and saves it."""
    from stand.api import generate

    path = tmp_path / "t.ngt"
    path.write_bytes(b"")
    generate("the cat sat", tiny, params=SamplingParams(max_new_tokens=8),
             spec=SpecConfig(method="stand", table_path=str(path)))
    assert len(NGramTable.load(str(path))[0]) > 0


# ---- the table loader ------------------------------------------------------------------------------

def _crafted(path, header: dict, body: bytes = b"") -> str:
    hb = json.dumps(header).encode()
    data = MAGIC + struct.pack("<II", FORMAT_VERSION, len(hb)) + hb + body
    with open(path, "wb") as f:
        f.write(data + hashlib.sha256(data).digest())  # a valid checksum: only the sizes can stop it
    return str(path)


@pytest.mark.parametrize("header,message", [
    ({"max_n": 4, "topk": 10, "n": 1 << 40, "capacity": 1 << 40}, "n = 1099511627776 is not an integer in"),
    ({"max_n": 1 << 40, "topk": 10, "n": 0}, "max_n = 1099511627776 is not an integer in"),
    ({"max_n": 4, "topk": 1 << 33, "n": 0}, "topk = 8589934592 is not an integer in"),
    ({"max_n": 4, "topk": 10, "n": 0, "capacity": 1 << 45}, "capacity of 35184372088832 slots"),
    ({"max_n": 4, "topk": 10, "n": 3}, "has 0 data bytes, expected 300"),
    ({"max_n": -1, "topk": 10, "n": 0}, "max_n = -1"),
    ({"max_n": "4", "topk": 10, "n": 0}, "max_n = '4'"),
    ({"max_n": 4, "topk": 10}, "bad header"),
])
def test_crafted_header_cannot_make_the_loader_allocate(tmp_path, header, message):
    path = _crafted(tmp_path / "t.ngt", header)
    t0 = time.perf_counter()
    with pytest.raises(StandError, match=message):
        NGramTable.load(path)
    assert time.perf_counter() - t0 < 2.0


def _body(keys, ids, probs, counts) -> bytes:
    return b"".join(np.asarray(a, dtype=d).tobytes() for a, d in ((keys, "<i4"), (ids, "<i4"), (probs, "<f4"),
                                                                  (counts, "<i4")))


GOOD = dict(keys=[[-1, 5]], ids=[[7, 8]], probs=[[0.5, 0.25]], counts=[1])


@pytest.mark.parametrize("change,message", [
    ({"ids": [[7, 300]]}, "next-token ids outside the vocabulary"),
    ({"ids": [[7, -5]]}, "next-token ids outside the vocabulary"),
    ({"keys": [[-1, 259]]}, "key ids outside the vocabulary"),
    ({"keys": [[5, -1]]}, "keys not left-padded"),
    ({"probs": [[float("nan"), 0.1]]}, r"probabilities outside \[0, 1\]"),
    ({"probs": [[1.5, 0.1]]}, r"probabilities outside \[0, 1\]"),
    ({"probs": [[-0.1, 0.1]]}, r"probabilities outside \[0, 1\]"),
    ({"probs": [[0.9, 0.9]]}, "sum over 1"),
    ({"ids": [[7, 7]]}, "naming a token twice"),
    ({"counts": [0]}, "counts below 1"),
])
def test_loader_checks_ids_and_probabilities(tmp_path, change, message):
    arrays = {**GOOD, **change}
    header = {"max_n": 2, "topk": 2, "n": 1, "capacity": 8, "meta": {"vocab_size": 259}}
    good = _crafted(tmp_path / "good.ngt", header, _body(**GOOD))
    assert len(NGramTable.load(good)[0]) == 1
    with pytest.raises(StandError, match=message):
        NGramTable.load(_crafted(tmp_path / "bad.ngt", header, _body(**arrays)))


def test_a_damaged_table_is_not_loaded_by_the_drafter_but_replaced(tiny, tmp_path):
    header = {"max_n": 4, "topk": 10, "n": 1, "meta": {"vocab_size": tiny.vocab_size}}
    ids = [[7, 9999] + [-1] * 8]
    path = _crafted(tmp_path / "t.ngt", header, _body([[-1, -1, -1, 5]], ids, [[0.5, 0.1] + [0] * 8], [1]))
    d = make_drafter(SpecConfig(method="stand", table_path=path, options={"max_n": 4}), tiny.vocab_size)
    assert "outside the vocabulary" in d.table_error and len(d.tables["shared"]) == 0


# ---- concurrent writers ----------------------------------------------------------------------------

def _write_many(path: str, seed: int, times: int) -> None:
    t = NGramTable(max_n=2, topk=4, capacity=4096)
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 50, size=2000)
    ids = np.argsort(rng.random((2000, 50)), axis=1)[:, :4]
    t.insert(np.stack([np.r_[-1, toks[:-1]], toks], 1), ids, rng.dirichlet(np.ones(4), size=2000))
    for _ in range(times):
        t.save(path, meta={"writer": seed})


def test_concurrent_writers_leave_a_whole_table(tmp_path):
    """Last writer wins, never a torn file: processes and threads saving one path at once."""
    path = str(tmp_path / "t.ngt")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(path, s, 15)) for s in (1, 2)]
    threads = [threading.Thread(target=_write_many, args=(path, s, 15)) for s in (3, 4)]
    for w in procs + threads:
        w.start()
    while any(p.is_alive() for p in procs) or any(t.is_alive() for t in threads):
        if os.path.exists(path):
            NGramTable.load(path)  # a reader in the middle sees a whole table
    for w in procs + threads:
        w.join()
    assert all(p.exitcode == 0 for p in procs)
    table, meta = NGramTable.load(path)
    assert meta["writer"] in (1, 2, 3, 4) and len(table) > 0
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary file left behind


# ---- solve --json on SIGTERM and Ctrl-C ------------------------------------------------------------

CHILD = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "from stand.cli import main; sys.argv[0] = 'stand'; main()")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_solve_json_is_written_when_stopped(tiny_dir, tmp_path, sig):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"count to {i}", "answer": i}) + "\n" for i in range(200)))
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "STAND_CACHE": str(tmp_path / "cache"), "STAND_TEST_THREADS": "1"}
    cmd = [sys.executable, "-c", CHILD, "solve", "--jsonl", str(prompts), "--model", tiny_dir, "--n", "2",
           "--max-new-tokens", "64", "--schedule", "batched", "--method", "stand", "--json", str(out)]
    with open(tmp_path / "err.txt", "w") as err_file:  # a file: progress bars cannot fill a pipe and block it
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
        first = child.stdout.readline()  # the first problem's line
        assert first.startswith("[1/200]"), first + (tmp_path / "err.txt").read_text()
        child.send_signal(sig)
        rest, _ = child.communicate(timeout=120)
    err = (tmp_path / "err.txt").read_text()
    assert child.returncode == 130, err
    assert "Traceback" not in err and "interrupted: " in err
    doc = json.loads(out.read_text())
    assert doc["config"]["interrupted"] is True and doc["config"]["questions"] == 200
    assert 1 <= len(doc["solutions"]) < 200
    printed = (first + rest).count("/200]")
    assert printed <= len(doc["solutions"]) <= printed + 1  # every finished question (one may beat its line)
    assert "tok/s" in rest  # the summary too
