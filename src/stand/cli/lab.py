"""`stand bench`, `stand profile`, `stand calibrate` and `stand convert`: measuring and preparing."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from stand.cli.common import (BackendOpt, CostOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxNewOpt, ModelOpt, NodesOpt, RoundsOpt,
                              SeedOpt, StepDelimiterOpt, StepTokensOpt, TableOpt, TemperatureOpt, TopKOpt, TopPOpt,
                              TreeOpt, WidthOpt, app, int_list, load, names, out_file, sampling, search_config,
                              sigterm_interrupts, speculation, user_errors)
from stand.errors import StandError


@app.command("bench")
@user_errors
def bench_cmd(
    methods: str = typer.Option("none,pld", "--methods", help="Comma-separated methods (plus the anchors hf, hf-pld, hf-batched, llama.cpp, llama.cpp-pld, vllm, vllm-ngram, vllm-suffix, vllm-stand, vllm-consensus, vllm-ngrammys)"),
    dataset: str = typer.Option("champ", "--dataset"),
    problems: int = typer.Option(4, "--problems"),
    first: int = typer.Option(0, "--first", help="Index of the first problem"),
    n: str = typer.Option("1", "--n", help="Samples per problem; comma-separated for several, e.g. 1,8"),
    schedules: str = typer.Option("batched", "--schedule", help="For n > 1: batched, sequential, auto, or several (comma-separated)"),
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    max_new_tokens: MaxNewOpt = 256,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    tree: TreeOpt = None,
    table: TableOpt = None,
    cost: CostOpt = None,
    nodes: NodesOpt = None,
    json_path: JsonOpt = None,
    repeats: int = typer.Option(1, "--repeats", help="Run every problem R times: median tok/s and its min-max"),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write PNG figures into this directory"),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One short untimed run of every row first"),
):
    """Methods and Hugging Face anchors side by side on the same problems, interleaved; a table, JSON, plots."""
    from rich.console import Console

    from stand.lab.bench import BenchConfig
    from stand.lab.report import rich_table, write_rows

    cfg = BenchConfig(names(methods), dataset, problems, int_list(n, "--n"),
                      sampling(temperature, top_p, top_k, max_new_tokens, seed), speculation("none", tree, table, cost, nodes),
                      names(schedules), repeats, warmup, first, model).validate()
    json_path = out_file(json_path, "--json")
    rows = _bench_with_bar(load(model, backend, dtype, device=device), cfg)
    if json_path:  # files first: a Ctrl-C may also have closed the pipe behind stdout
        write_rows(rows, json_path)
    if plot:
        from stand.lab.plots import plot_all

        for path in plot_all(rows, plot):
            typer.echo(f"wrote {path}", err=True)
    Console(width=None if sys.stdout.isatty() else 160).print(rich_table(rows))  # a log file keeps every column
    if not rows or rows[0]["interrupted"]:
        typer.echo("interrupted: the rows cover the problems that every method finished", err=True)
        raise typer.Exit(130)


def _bench_with_bar(target, cfg) -> list[dict]:
    from tqdm import tqdm

    from stand.lab.bench import bench

    # bench keeps the rows finished before a Ctrl-C, and so before a `kill` or `timeout`
    with sigterm_interrupts(), tqdm(total=cfg.repeats * cfg.problems * len(cfg.variants()), desc="bench",
                                    unit="run", file=sys.stderr) as bar:
        def progress(label: str, done: bool) -> None:
            if not done and bar.n == 0 and not label.startswith("warm-up"):
                bar.reset()  # the rate and the time left count from the first timed run
            bar.update(1) if done else bar.set_postfix_str(label)

        return bench(target, cfg, progress=progress)



@app.command("search-bench")
@user_errors
def search_bench_cmd(
    methods: str = typer.Option("none,stand", "--methods", help="Comma-separated methods of our engine"),
    strategies: str = typer.Option("single,self-consistency,best-of-n,beam,dvts", "--strategies", help="Comma-separated: single (n=1), self-consistency, best-of-n, beam, dvts"),
    dataset: str = typer.Option("arithmetic:1", "--dataset", help="champ | arithmetic[:LEVEL[:SEED]] | humaneval"),
    problems: int = typer.Option(40, "--problems"),
    first: int = typer.Option(0, "--first", help="Index of the first problem (CHAMP: 200 for the held-out problems)"),
    n: int = typer.Option(8, "--n", help="Samples per problem; a search's candidates per round"),
    width: WidthOpt = 4,
    step_delimiter: StepDelimiterOpt = "\\n\\n",
    step_tokens: StepTokensOpt = 128,
    rounds: RoundsOpt = 32,
    schedule: str = typer.Option("batched", "--schedule", help="self-consistency / best-of-n samples: batched | sequential | auto"),
    temperature: TemperatureOpt = 0.6,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    max_new_tokens: MaxNewOpt = 512,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    tree: TreeOpt = None,
    cost: CostOpt = None,
    nodes: Optional[int] = typer.Option(None, "--nodes", help="Ask every row for this many draft nodes each pass (equal budgets at every n; no cost sizing)"),
    json_path: JsonOpt = None,
):
    """Beam search and DVTS beside self-consistency and best-of-N, per method, on the same problems: accuracy,
    tokens per problem, tok/s and tokens per pass (A), methods interleaved; a table and JSON."""
    import os
    from dataclasses import replace

    from tqdm import tqdm

    from stand.core.files import write_json
    from stand.lab.search_bench import SearchBenchConfig, as_json, bench_search, records, summary, table
    from stand.tts.problems import load_dataset

    cfg = SearchBenchConfig(names(methods), names(strategies), n, sampling(temperature, top_p, top_k, max_new_tokens, seed),
                            replace(speculation("none", tree, None, cost), nodes=nodes),
                            search_config(width, step_delimiter, step_tokens, rounds), schedule).validate()
    json_path = out_file(json_path, "--json")
    items = load_dataset(dataset, first + problems)[first:]
    if not items:
        raise StandError(f"dataset {dataset} has no problems from index {first}")
    target = load(model, backend, dtype)
    with sigterm_interrupts(), tqdm(total=len(items), desc="search-bench", unit="problem", file=sys.stderr) as bar:
        def progress(label: str) -> None:
            bar.n = int(label.split("/")[0]) - 1
            bar.set_postfix_str(label)

        results = bench_search(target, items, cfg, progress)
    machine = {"backend": target.kind, "model": target.name, "dtype": str(target.dtype),
               "load_average_at_end": os.getloadavg(), "dataset": dataset, "first": first}
    if json_path:
        write_json(json_path, as_json(results, cfg, machine), indent=2)
    typer.echo(f"{dataset}, problems {first + 1}-{first + len(items)}, n={n}, width {width}, T={temperature}, "
               f"{target.name} on {target.kind}")
    typer.echo(table(summary(records(results))))
    finished = min(len(sols) for sols in results.values())
    if finished < len(items):
        typer.echo(f"interrupted: the rows cover the {finished} problems every strategy and method finished", err=True)
        raise typer.Exit(130)


@app.command("profile")
@user_errors
def profile_cmd(
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    cache_len: int = typer.Option(500, "--cache-len", help="Tokens already in the cache"),
    reps: int = typer.Option(10, "--reps", help="Timed forwards per size (median reported)"),
    json_path: JsonOpt = None,
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)"),
    grid_path: Optional[str] = typer.Option(None, "--grid", help="Also measure ours over rows x tokens per row and write that cost grid (JSON) here"),
):
    """Milliseconds per forward by new tokens (1..64) and by batch (4, 8, 16 rows), ours beside Hugging Face."""
    import torch

    from stand.core.files import write_json
    from stand.lab.hf_anchors import has_hf_forward
    from stand.lab.profile import (ProfileConfig, as_json, cost_curves, ours, profile_targets, remeasure, split_lines,
                                   table_lines)

    if cache_len < 1 or reps < 1 or (threads is not None and threads < 1):
        raise StandError("--cache-len, --reps and --threads must be at least 1")
    json_path, grid_path = out_file(json_path, "--json"), out_file(grid_path, "--grid")
    if threads:
        torch.set_num_threads(threads)
    target = load(model, backend, dtype, device=device)  # the engine stand decodes with (auto: measured)
    if has_hf_forward(target):  # beside transformers' forward of the same weights
        target = load(model, target.kind, str(target.dtype).replace("torch.", ""), forward="hf", device=device)
    curves = cost_curves(profile_targets(target), ProfileConfig(cache_len=cache_len, reps=reps),
                         progress=lambda msg: typer.echo(f"  {msg}", err=True))
    typer.echo(f"ms per forward, {target.name} on {target.kind}, {target.dtype}, cache {cache_len}, median of {reps}, "
               f"{torch.get_num_threads()} threads")
    for line in table_lines(curves):
        typer.echo(line)
    for line in split_lines(ours(target), cache_len):
        typer.echo(line)
    if json_path:
        write_json(json_path, as_json(curves), indent=2)
    if grid_path:
        for line in remeasure(ours(target), reps, grid_path, lambda msg: typer.echo(f"  grid: {msg}", err=True)):
            typer.echo(line)



@app.command("calibrate")
@user_errors
def calibrate_cmd(
    dataset: str = typer.Option("champ", "--dataset"),
    problems: int = typer.Option(4, "--problems", help="Calibration problems (the first K of the dataset)"),
    first: int = typer.Option(0, "--first", help="Index of the first calibration problem"),
    out: str = typer.Option("tree.json", "--out", help="Where to write the tree JSON"),
    plot: Optional[str] = typer.Option(None, "--plot", help="PNG of accepted tokens and tok/s against M (default: OUT with .png)"),
    n: int = typer.Option(1, "--n", help="Samples per problem, sharing one n-gram table (calibrate at the N you run)"),
    schedule: str = typer.Option("sequential", "--schedule", help="For n > 1: sequential (each sample drafts from a table the earlier ones warmed) or batched"),
    temperature: TemperatureOpt = 0.6,
    max_new_tokens: MaxNewOpt = 1024,
    template_size: int = typer.Option(600, "--template-size", help="Nodes of the large template whose acceptance is counted"),
    keep: int = typer.Option(80, "--keep", help="Most-accepted nodes the tree keeps (the tree drafted without a cost grid)"),
    cost: Optional[str] = typer.Option(None, "--cost", help="Cost grid from `stand profile --grid` or curve from `--json` (default: measure now)"),
    max_m: int = typer.Option(160, "--max-m", help="Largest tree size considered"),
    counts: Optional[str] = typer.Option(None, "--counts", help="Decode nothing: choose M again from the counts in this calibrated tree file, or several (comma-separated: their counts added up), with --cost"),
    tree: Optional[str] = typer.Option(None, "--tree", help="A second stage: count the nodes of this tree (an earlier calibration's, on other problems) instead of a large template's, so the counts that rank the kept nodes are not the ones that chose them"),
    method: str = typer.Option("stand", "--method", help="The STAND variant whose drafts are counted, options in brackets: stand[recency=1]"),
    traces: Optional[str] = typer.Option(None, "--traces", help="Replay these fixed texts (python -m stand.lab.replay --traces JSON, N a problem) and count each node's exact chance of acceptance instead of decoding"),
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
):
    """Calibrate STAND's draft tree: count accepted nodes of a 600-node template, keep the best M for this machine."""
    from tqdm import tqdm

    from stand.lab.calibrate import CalibrateConfig, calibrate, calibration_prompts, save

    params = sampling(temperature, max_new_tokens=max_new_tokens)
    if schedule not in ("sequential", "batched"):
        raise StandError(f"--schedule must be sequential or batched, got {schedule!r}")
    cfg = CalibrateConfig(dataset, problems, first, n, schedule, temperature=params.temperature,
                          max_new_tokens=params.max_new_tokens, template_size=template_size, max_m=max_m, keep=keep,
                          cost_curve=cost, method=method, traces=traces, tree=tree).validate()
    if counts and tree:
        raise StandError("--counts decodes nothing and --tree counts a tree by decoding: give one of them")
    out, plot = out_file(out, "--out"), out_file(plot or (out.rsplit(".", 1)[0] + ".png"), "--plot")
    target = load(model, backend, dtype, device=device)
    if counts:
        from stand.core.cost import CostGrid
        from stand.lab.calibrate import recount
        from stand.backends.protocol import pads
        from stand.backends.machine import machine_grid

        cal, cfg = recount(names(counts), (CostGrid.load(cost) if cost else machine_grid(target)).with_padding(pads(target)))
    else:
        prompts = calibration_prompts(target, cfg)
        with tqdm(total=len(prompts) * n * cfg.max_new_tokens, desc="calibrate", unit="tok", file=sys.stderr) as bar:
            cal = calibrate(target, prompts, cfg, progress=bar.update)
    meta = save(cal, target, cfg, out, plot)
    typer.echo(f"M = {cal.m} nodes: {meta['expected_accepted']:.2f} tokens/step, {meta['expected_tokens_per_s']:.1f} tok/s "
               f"expected, from {cal.steps} steps; wrote {out} (the best {len(cal.tree)} nodes with their counts) and {plot}")



@app.command("convert")
@user_errors
def convert_cmd(gguf: str = typer.Argument(..., help="A .gguf model file"), out: str = typer.Argument(..., help="A new or empty directory (--to hf); a new .gguf file (else)"),
                to: str = typer.Option("hf", "--to", help="hf: a Hugging Face directory (float32) for vLLM | bf16, f16, q8_0, f32: a GGUF file re-encoded by llama.cpp")):
    """A Hugging Face model directory (float32 weights, tokenizer) from a GGUF file, for vLLM; or the GGUF re-encoded."""
    from stand.backends.convert import convert

    typer.echo(f"wrote {convert(gguf, out, to)}")
