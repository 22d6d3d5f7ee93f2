"""Bad input: one clear line, exit code 2, no traceback."""

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
