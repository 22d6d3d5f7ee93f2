"""stand bench on the tiny model: every column, JSON, PNGs, the anchors, Ctrl-C, the CLI."""

import json
import struct

import pytest

from stand.lab.bench import COLUMNS, BenchConfig, bench, summarise
from stand.lab.report import read_rows, rich_table, write_rows
from stand.errors import StandError
from stand.lab.plots import plot_all
from stand.params import SamplingParams, SpecConfig

METHODS = ["none", "pld", "stand", "hf", "hf-pld", "hf-batched"]


@pytest.fixture(scope="module")
def rows(tiny):
    cfg = BenchConfig(METHODS, "champ", 2, 1, params=SamplingParams(0.6, max_new_tokens=32, seed=0), warmup=False)
    return bench(tiny, cfg)


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_every_variant_has_every_column(rows):
    assert [(r["method"], r["n"]) for r in rows] == [(m, 1) for m in METHODS]
    for r in rows:
        assert set(COLUMNS) <= set(r), set(COLUMNS) - set(r)
        assert r["dtype"] == "float32" and r["temperature"] == 0.6 and r["problems"] == 2 and not r["interrupted"]
        assert 0 < r["new_tokens"] <= 2 * r["n"] * 32
        rounding = 0.0005 / r["seconds"]  # seconds are reported to the millisecond; tok/s from the unrounded time
        assert r["seconds"] > 0 and r["tok_per_s"] == pytest.approx(r["new_tokens"] / r["seconds"], rel=0.01 + rounding)
        assert r["tok_per_s_min"] <= r["tok_per_s"] <= r["tok_per_s_max"]
        assert r["speedup_vs_none"] > 0 and r["speedup_vs_hf"] > 0
        assert r["accuracy"] is not None  # CHAMP has references
        assert r["mean_accepted"] >= (0.5 if r["method"] == "hf-batched" else 1.0)


def test_speedups_divide_by_none_and_hf_at_the_same_n(rows):
    by = {(r["method"], r["n"]): r for r in rows}
    for (m, n), r in by.items():
        assert r["speedup_vs_none"] == pytest.approx(r["tok_per_s"] / by["none", n]["tok_per_s"], abs=2e-3)
        assert r["speedup_vs_hf"] == pytest.approx(r["tok_per_s"] / by["hf", n]["tok_per_s"], abs=2e-3)
    assert by["none", 1]["speedup_vs_none"] == 1.0 and by["hf", 1]["speedup_vs_hf"] == 1.0


def test_ours_report_drafting_memory_and_acceptance(rows):
    for r in rows:
        ours = not r["method"].startswith("hf")
        assert (r["draft_share"] is not None) == ours and (r["table_bytes"] is not None) == ours
        assert (r["accept_counts"] is not None) == ours
        if ours:
            assert 0 <= r["draft_share"] < 1
            counts = r["accept_counts"]
            steps = sum(counts)
            assert sum(k * c for k, c in enumerate(counts)) == r["new_tokens"]  # every token lies in one step
            assert r["mean_accepted"] == pytest.approx(r["new_tokens"] / steps, abs=1e-3)
    by = {(r["method"], r["n"]): r for r in rows}
    assert by["none", 1]["accept_counts"] == [0, by["none", 1]["new_tokens"]]  # plain decoding: one token a step
    assert by["stand", 1]["table_bytes"] > 0 and by["none", 1]["table_bytes"] == 0


def test_json_and_pngs(rows, tmp_path):
    path = tmp_path / "rows.json"
    write_rows(rows, str(path))
    assert json.loads(path.read_text()) == rows and read_rows(str(path)) == rows
    pngs = plot_all(rows, str(tmp_path / "plots"))
    assert {p.rsplit("/", 1)[-1] for p in pngs} == {"tok_per_s.png", "accepted.png", "speedup_vs_n.png",
                                                   "acceptance.png"}
    for p in pngs:
        w, h = _png_size(p)
        assert w > 300 and h > 200


def test_rich_table_renders_every_row(rows):
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(rich_table(rows))
    text = console.export_text()
    for m in METHODS:
        assert m in text


def test_ctrl_c_keeps_the_problems_every_variant_finished(tiny):
    """KeyboardInterrupt in the middle of problem 2: rows cover problem 1 only, flagged interrupted."""
    cfg = BenchConfig(["none", "pld", "hf"], "champ", 2, 1, params=SamplingParams(max_new_tokens=8, seed=0), warmup=False)
    finished = []

    def progress(label: str, done: bool) -> None:
        if done:
            finished.append(label)
            if len(finished) == 4:  # 3 runs of problem 1, then one of problem 2
                raise KeyboardInterrupt

    rows = bench(tiny, cfg, progress=progress)
    assert [r["method"] for r in rows] == ["none", "pld", "hf"]
    assert all(r["interrupted"] and r["problems"] == 1 and r["new_tokens"] > 0 for r in rows)


def test_interrupt_before_any_common_problem_gives_no_rows(tiny):
    assert summarise({("none", 1, "batched"): {}, ("pld", 1, "batched"): {}}, BenchConfig(), tiny, True) == []


def test_repeats_give_median_and_spread(tiny):
    cfg = BenchConfig(["none", "hf"], "champ", 1, 1, params=SamplingParams(max_new_tokens=8, seed=0), repeats=3,
                      warmup=True)
    rows = bench(tiny, cfg)
    for r in rows:
        assert r["repeats"] == 3 and r["problems"] == 1
        assert r["tok_per_s_min"] <= r["tok_per_s"] <= r["tok_per_s_max"]
        assert r["new_tokens"] % 3 == 0  # greedy: the same sample in every repeat
    assert rows[0]["new_tokens"] == rows[1]["new_tokens"]  # and the same as Hugging Face greedy


def test_config_errors_name_what_was_wrong():
    with pytest.raises(StandError, match="unknown method"):
        BenchConfig(["none", "fast"]).validate()
    with pytest.raises(StandError, match="repeats"):
        BenchConfig(repeats=0).validate()
    with pytest.raises(StandError, match="schedule"):
        BenchConfig(schedule="parallel").validate()


def test_cli_bench_writes_json_and_plots(tiny, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import stand.api
    from stand.cli import app

    monkeypatch.setattr(stand.api, "load_target", lambda *a, **k: tiny)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["bench", "--methods", "none,pld,hf,hf-batched", "--problems", "1", "--n", "1,2",
                                   "--max-new-tokens", "8", "-t", "0.6", "--no-warmup", "--json", str(out),
                                   "--plot", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert [(r["method"], r["n"]) for r in rows] == [(m, n) for n in (1, 2) for m in ("none", "pld", "hf", "hf-batched")]
    assert all(r["new_tokens"] <= 8 * r["n"] for r in rows)
    assert (tmp_path / "p" / "tok_per_s.png").exists()
    bad = CliRunner().invoke(app, ["bench", "--repeats", "0"])
    assert bad.exit_code == 2 and "repeats" in bad.output


def test_markdown_table_has_a_line_per_row(rows):
    from stand.lab.report import markdown_table

    lines = markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(rows) and all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2].split("|")[1].strip() == max(rows, key=lambda r: r["tok_per_s"])["method"]


def test_cli_interrupted_still_writes_the_finished_rows(tiny, tmp_path, monkeypatch):
    """A SIGTERM (as from `timeout`) during problem 2: JSON holds problem 1's rows, exit code 130."""
    import os
    import signal

    from typer.testing import CliRunner

    import stand.lab.bench
    import stand.api
    from stand.cli import app

    monkeypatch.setattr(stand.api, "load_target", lambda *a, **k: tiny)
    real, calls = stand.lab.bench.run_variant, []

    def run_variant(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # none and pld finished problem 1; the first run of problem 2 is cut short
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(stand.lab.bench, "run_variant", run_variant)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["bench", "--methods", "none,pld", "--problems", "2", "--max-new-tokens", "8",
                                   "--no-warmup", "--json", str(out)])
    assert res.exit_code == 130, res.output
    rows = json.loads(out.read_text())
    assert [(r["method"], r["problems"], r["interrupted"]) for r in rows] == [("none", 1, True), ("pld", 1, True)]
    assert signal.getsignal(signal.SIGTERM) is handler and "interrupted" in res.output  # handler restored


def test_greedy_anchors_at_n2_match_plain_decoding(tiny):
    """Greedy: hf-batched (a hand-built batch, as HF refuses num_return_sequences there) runs, and every row
    produces as many tokens as plain decoding (the same greedy text, or EOS at the same place)."""
    from stand.lab.bench import run_variant
    from stand.lab.hf_anchors import hf_generate
    from stand.tts.problems import champ

    problem = champ(1)[0]
    ids = tiny.encode(problem.prompt)
    params = SamplingParams(0.0, max_new_tokens=12, seed=0)
    seqs = {m: hf_generate(tiny, ids, m, 2, params)[0] for m in ("hf", "hf-batched")}
    assert seqs["hf"] == seqs["hf-batched"] and seqs["hf"][0] == seqs["hf"][1]
    ours = run_variant(tiny, ("none", 2, "batched"), problem, BenchConfig(params=params), 0)
    assert ours.new_tokens == sum(map(len, seqs["hf"]))
    from stand.api import generate

    assert generate(problem.prompt, model=tiny, params=params)[0][0].token_ids == seqs["hf"][0]


def test_table_warm_start_and_first_problem(tiny, tmp_path):
    table = tmp_path / "t.ngram"
    cfg = BenchConfig(["stand"], "champ", 1, 1, params=SamplingParams(0.0, max_new_tokens=16, seed=0),
                      spec=SpecConfig(table_path=str(table)), warmup=False, first=3)
    cold = bench(tiny, cfg)[0]
    assert table.exists() and cold["problems"] == 1  # the table was saved at the end of the run
    warm = bench(tiny, cfg)[0]
    assert warm["new_tokens"] == cold["new_tokens"]  # greedy: same text, only the drafts differ
    assert warm["mean_accepted"] >= cold["mean_accepted"]  # the same problem again: the table knows it
    with pytest.raises(StandError, match="has 270 problems .indices 0..269.; first 10000 is beyond them"):
        bench(tiny, BenchConfig(["none"], "champ", 1, 1, first=10_000, warmup=False))
