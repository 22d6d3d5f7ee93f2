"""Prompt sources: CHAMP, HumanEval (from the installed packages, no download), a user's JSONL file; `stand solve`."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from stand.cli import app
from stand.tts.problems import CODE_INSTRUCTION, MATH_INSTRUCTION, champ, humaneval, jsonl, load_dataset, question
from stand.errors import StandError


def test_champ():
    problems = champ()
    assert len(problems) == 270 and all(p.answer for p in problems)
    assert problems[0].prompt.startswith(MATH_INSTRUCTION) and problems[0].category == "Combinatorics"
    assert len({p.id for p in problems}) == 270
    assert champ(2, instruction="Q: ")[1].prompt.startswith("Q: ") and len(champ(2)) == 2


def test_humaneval():
    problems = humaneval()
    assert len(problems) == 164
    p = problems[0]
    assert p.id == "HumanEval/0" and p.answer is None and p.prompt.startswith(CODE_INSTRUCTION)
    assert "def has_close_elements" in p.prompt and p.meta["entry_point"] == "has_close_elements"
    assert "def check" in p.meta["test"]
    assert len(load_dataset("humaneval", 3, instruction="")) == 3
    assert load_dataset("humaneval", 1, instruction="")[0].prompt == p.meta["code_prompt"]


def write(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "qs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl(tmp_path):
    path = write(tmp_path, ['{"prompt": "2+2?", "answer": 4}', "", '{"prompt": "Name a colour", "id": "c1"}'])
    a, b = jsonl(path)
    assert (a.id, a.prompt, a.answer) == ("1", "2+2?", "4")
    assert (b.id, b.answer) == ("c1", None)
    assert jsonl(path, instruction="Solve: ")[0].prompt == "Solve: 2+2?"
    assert len(load_dataset(path, 1)) == 1


@pytest.mark.parametrize("bad,msg", [("{not json", "line 2: not valid JSON"), ('["a"]', "line 2: expected an object"),
                                     ('{"answer": "3"}', 'line 2: "prompt" must be'),
                                     ('{"prompt": "  "}', 'line 2: "prompt" must be'),
                                     ('{"prompt": "x", "answer": [1]}', 'line 2: "answer" must be')])
def test_jsonl_bad_line_names_its_number(tmp_path, bad, msg):
    path = write(tmp_path, ['{"prompt": "ok"}', bad, '{"prompt": "fine"}'])
    with pytest.raises(StandError, match=msg):
        jsonl(path)


def test_dataset_errors(tmp_path):
    with pytest.raises(StandError, match="not found"):
        jsonl(str(tmp_path / "missing.jsonl"))
    with pytest.raises(StandError, match="no problems"):
        jsonl(write(tmp_path, ["", "  "]))
    with pytest.raises(StandError, match="unknown dataset 'gsm'"):
        load_dataset("gsm")
    with pytest.raises(StandError, match=">= 1"):
        load_dataset("champ", 0)
    with pytest.raises(StandError, match="empty"):
        question("  ")
    assert question("1+1?").prompt == MATH_INSTRUCTION + "1+1?"


# ---- the command ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import save_tiny

    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


def test_solve_command(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path, ['{"prompt": "1+1=", "answer": "2"}', '{"prompt": "abcabc", "answer": "c"}'])
    out = tmp_path / "samples.json"
    r = CliRunner().invoke(app, ["solve", "--jsonl", path, "--model", tiny_dir, "--n", "2", "--max-new-tokens", "6",
                                 "--method", "pld", "--schedule", "batched", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "[1/2]" in r.output and "[2/2]" in r.output and "accuracy" in r.output and "tok/s" in r.output
    data = json.loads(out.read_text())
    assert len(data["solutions"]) == 2 and len(data["solutions"][0]["samples"]) == 2
    assert {"text", "answer", "score", "stats", "logprobs"} <= set(data["solutions"][0]["samples"][0])
    assert "single sample" in r.output and data["single_sample_accuracy"]["samples"] == 4
    r = CliRunner().invoke(app, ["solve", "--dataset", "arithmetic:2", "--problems", "2", "--model", tiny_dir, "--n", "2",
                                 "--max-new-tokens", "4", "--schedule", "batched", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert re.search(r"accuracy self-consistency@2 \d/2 = .* single sample \d/4 = ", r.output), r.output
    assert data["accuracy"]["judged"] == 2 and data["single_sample_accuracy"]["samples"] == 4
    r = CliRunner().invoke(app, ["solve", "What is 1+1?", "--model", tiny_dir, "--n", "2", "--max-new-tokens", "4",
                                 "--schedule", "sequential"])
    assert r.exit_code == 0, r.output
    assert "[1/1]" in r.output and "tokens/step by sample index" in r.output


def test_solve_command_user_errors(tmp_path):
    path = write(tmp_path, ['{"prompt": "ok"}', "oops"])
    r = CliRunner().invoke(app, ["solve", "--jsonl", path])
    assert r.exit_code == 2 and "line 2" in r.output
    r = CliRunner().invoke(app, ["solve", "q", "--dataset", "champ"])
    assert r.exit_code == 2 and "exactly one" in r.output
    r = CliRunner().invoke(app, ["solve", "q", "--strategy", "best"])
    assert r.exit_code == 2 and "strategy" in r.output
