"""Bad input: one clear line, exit code 2, no traceback."""

import os

import pytest
from typer.testing import CliRunner

from stand.cli import app
from tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


BAD = [
    (["generate", ""], "prompt 0 is empty"),
    (["generate", "hi", "--n", "0"], "n must be"),
    (["generate", "hi", "--temperature", "-0.5"], "temperature must be >= 0"),
    (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be"),
    (["generate", "hi", "--model", "/no/such/model"], "model path does not exist"),
    (["generate", "hi", "--method", "magic"], "unknown method"),
    (["generate", "hi", "--seed", "-1"], "seed must be an integer in [0, 2^63), got -1"),
    (["solve", "q", "--seed", str(2**63)], "seed must be an integer in [0, 2^63)"),
    (["generate", "hi", "-t", "1e-45"], "temperature must be 0 (greedy) or at least 0.001, got 1e-45"),
    (["bench", "-t", "nan"], "temperature must be >= 0 and finite"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_prompt_longer_than_context(tiny_dir):
    result = CliRunner().invoke(app, ["generate", "x" * 600, "--model", tiny_dir])
    assert result.exit_code == 2 and "longer than the model's context of 512" in result.output


def test_generate_runs_on_a_model_directory(tiny_dir):
    result = CliRunner().invoke(app, ["generate", "hello", "--model", tiny_dir, "--max-new-tokens", "8",
                                      "--method", "pld", "--json"])
    assert result.exit_code == 0, result.output
    assert '"new_tokens": 8' in result.output


# ---- CLI and files: checks before the model loads; files kept whole ----------------------------------------------

BEFORE_LOADING = [
    (["calibrate", "--max-m", "0"], "max_m must be"),
    (["calibrate", "--out", "."], ". is a directory"),
    (["calibrate", "--plot", "."], ". is a directory"),
    (["profile", "--json", "."], ". is a directory"),
    (["profile", "--grid", "."], ". is a directory"),
    (["bench", "--json", "."], ". is a directory"),
    (["bench", "--dataset", "foo"], "unknown dataset 'foo'"),
    (["bench", "--first", "-1"], "first must be >= 0"),
    (["bench", "--first", "300"], "champ has 270 problems"),
    (["calibrate", "--first", "270"], "champ has 270 problems"),
    (["calibrate", "--method", "recycle"], "--method must be stand"),
    (["calibrate", "--traces", "no-such-traces.json"], "no such file"),
    (["bench", "--problems", "0"], "problems must be"),
]


@pytest.mark.parametrize("args,message", BEFORE_LOADING, ids=[" ".join(a) for a, _ in BEFORE_LOADING])
def test_cli_and_files_checked_before_loading_the_model(monkeypatch, args, message):
    import stand.cli.lab as lab

    monkeypatch.setattr(lab, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


BAD_GRIDS = [
    ({"format": "stand-cost-grid", "ms": {"1": {"1": float("nan")}}}, "finite"),
    ({"format": "stand-cost-grid", "ms": {"1": {"1": 0.0}}}, "positive"),
    ({"format": "stand-cost-grid", "ms": {"1": {"1": -3.0}}}, "positive"),
    ({"format": "stand-cost-grid", "ms": {"1": {"1000000000": 1.0}}}, "tokens per row"),
    ({"format": "stand-cost-grid", "ms": {"0": {"1": 1.0}}}, "rows"),
    ({"format": "stand-cost-grid", "ms": {"100000": {"1": 1.0}}}, "rows"),
    ({"format": "stand-cost-grid", "ms": {"1": {"1": float("inf")}}}, "finite"),
]


@pytest.mark.parametrize("doc,message", BAD_GRIDS, ids=[m + str(i) for i, (_, m) in enumerate(BAD_GRIDS)])
def test_cli_and_files_cost_grid_is_checked(tmp_path, monkeypatch, doc, message):
    import json

    import stand.cli.run as run
    from stand.core.cost import CostGrid
    from stand.errors import StandError

    with pytest.raises(StandError, match=message):
        CostGrid.from_dict(doc, "grid")
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setattr(run, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    result = CliRunner().invoke(app, ["generate", "hi", "--cost", str(path)])
    assert result.exit_code == 2 and message in result.output, result.output


def test_cli_and_files_tree_with_a_list_as_provenance(tmp_path, monkeypatch):
    import json

    import stand.cli.run as run

    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps({"format": "stand-tree", "version": 1, "nodes": [[-1, 0]], "provenance": [1, 2]}))
    monkeypatch.setattr(run, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    result = CliRunner().invoke(app, ["generate", "hi", "--method", "stand", "--tree", str(tree)])
    assert result.exit_code == 2 and "provenance" in result.output and "Traceback" not in result.output, result.output


def test_cli_and_files_symlinked_table_stays_a_link(tmp_path):
    from stand.drafters.ngram_table import NGramTable

    real, link = tmp_path / "real.ngt", tmp_path / "link.ngt"
    NGramTable(4, 10, 64).save(str(real))
    link.symlink_to(real)
    NGramTable(4, 10, 128).save(str(link))
    assert link.is_symlink() and NGramTable.load(str(link))[0].capacity == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.ngt", "real.ngt"]


def test_cli_and_files_temporary_files_unpredictable_and_cleaned_after_a_kill(tmp_path):
    """A writer killed mid-write (SIGKILL) leaves its temporary file; the next write of that path removes it. The
    names are not derived from the path and the pid alone (nobody can plant one first)."""
    import subprocess
    import sys

    from stand.core.files import atomic_path

    target = tmp_path / "out.json"
    script = ("import os, sys, time\nfrom stand.core.files import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n    open(tmp, 'w').write('half')\n"
              "    print(tmp, flush=True)\n    os.kill(os.getpid(), 9)\n")
    out = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True)
    left = out.stdout.strip()
    assert os.path.exists(left) and not target.exists()
    names = []
    for _ in range(2):
        with atomic_path(str(target)) as tmp:
            names.append(tmp)
            open(tmp, "w").write("whole")
    assert names[0] != names[1] and f".tmp{os.getpid()}" not in names[0]
    assert not os.path.exists(left) and target.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_cli_and_files_bench_vllm_rows_on_the_default_backend(monkeypatch):
    """vLLM's dtype for a llama.cpp target (the default backend) is stand's auto choice, not an error; where vLLM
    is missing, the bench says so before loading the model."""
    import stand.cli.lab as lab
    from stand.integrations.vllm.launch import torch_dtype_name

    assert torch_dtype_name("auto") in ("bfloat16", "float32")
    assert torch_dtype_name("float32") == "float32"
    monkeypatch.setenv("STAND_VLLM_PYTHON", "/no/such/python")
    monkeypatch.setattr(lab, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    result = CliRunner().invoke(app, ["bench", "--methods", "vllm,vllm-stand"])
    assert result.exit_code == 2 and "STAND_VLLM_PYTHON=/no/such/python" in result.output, result.output
