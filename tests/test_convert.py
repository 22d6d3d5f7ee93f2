"""`stand convert MODEL.gguf OUTDIR`: the Hugging Face directory computes what the GGUF model computes, carries its
tokenizer, says nothing of quantisation, and an existing non-empty OUTDIR (or a file that is not GGUF) is refused
with one line and exit code 2."""

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from stand.cli import app
from tiny import save_gguf, tiny_model

TOKENS = ["a", "b", "ab", "c", "d", "<s>", "</s>", "<pad>"]  # one merge, a + b -> ab: a GGUF tokenizer transformers reads


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny8.gguf")
    return save_gguf(tiny_model(vocab_size=len(TOKENS), seed=3), TOKENS, path, bos=5, eos=6)


def test_convert_writes_a_directory_that_computes_the_same(gguf_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "hf")
    result = CliRunner().invoke(app, ["convert", gguf_file, out])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    x = torch.tensor([[1, 2, 3, 4, 0, 2]])
    with torch.inference_mode():
        assert torch.allclose(model(x).logits, tiny_model(vocab_size=len(TOKENS), seed=3)(x).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out)("abcd").input_ids == [2, 3, 4]
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config and config["dtype"] == "float32"


def test_convert_into_an_empty_directory(gguf_file, tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["convert", gguf_file, str(tmp_path / "empty")])
    assert result.exit_code == 0, result.output
    assert os.path.exists(tmp_path / "empty" / "model.safetensors")


@pytest.mark.parametrize("what", ["non-empty directory", "file"])
def test_convert_refuses_an_outdir_in_use(gguf_file, tmp_path, what):
    out = tmp_path / "out"
    if what == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["convert", gguf_file, str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: output directory") and len(result.output.strip().splitlines()) == 1
    assert "give a new or empty directory" in result.output
    assert (out if what == "file" else out / "notes.txt").read_text() == "keep me"


def test_convert_refuses_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    result = CliRunner().invoke(app, ["convert", str(bad), str(tmp_path / "out")])
    assert result.exit_code == 2 and "is not a GGUF file" in result.output, result.output
    assert not (tmp_path / "out").exists()
