"""The `stand` command (typer). User mistakes print one line and exit 2.

Flags that several commands share are declared once below (each command gives its own default) and
mapped onto SamplingParams by `sampling` and onto SpecConfig by `speculation`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from typing import Annotated, Optional

import typer

from stand.errors import StandError
from stand.params import METHODS, SamplingParams, SpecConfig
from stand.server.memory import serve_help

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Lossless model-free speculative decoding for test-time scaling.")

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hugging Face model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")]
BackendOpt = Annotated[str, typer.Option("--backend", help="auto | torch | llama.cpp (auto: llama.cpp for a .gguf file when llama-cpp-python is installed, else torch)")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="torch backend: auto | bfloat16 | float32 (auto: the faster here, measured once and cached)")]
MethodOpt = Annotated[str, typer.Option("--method", help=" | ".join(METHODS))]
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy")]
TopPOpt = Annotated[float, typer.Option("--top-p")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="0 = off")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed")]
TreeOpt = Annotated[Optional[str], typer.Option("--tree", help="STAND: a draft tree JSON from `stand calibrate` (default: the shipped one)")]
TableOpt = Annotated[Optional[str], typer.Option("--table", help="STAND: n-gram table file, loaded at start and saved at the end (a warm start for the next run)")]
CostOpt = Annotated[Optional[str], typer.Option("--cost", help="What a pass costs, which sizes each row's tree: default this machine's grid (measured once, cached); a grid JSON (`stand profile --grid`); tree: the calibrated tree's; off: a fixed share of each pass")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="Write the results to this JSON file")]


def sampling(temperature: float, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256,
             seed: int | None = None) -> SamplingParams:
    """The sampling flags as SamplingParams, checked (before any model is loaded)."""
    return SamplingParams(temperature, top_p, top_k, max_new_tokens, seed).validate()


def speculation(method: str = "none", tree: str | None = None, table: str | None = None, cost: str | None = None) -> SpecConfig:
    """The drafting flags as a SpecConfig, checked (before any model is loaded): a --table PATH that is a directory
    or a file other than a stand table is refused now, not overwritten or crashed on after decoding."""
    if table is not None:
        from stand.drafters.ngram_table import check_table_path

        check_table_path(table)
    return SpecConfig(method=method, tree=tree, table_path=table, cost_grid=cost).validate()


def out_file(path: str | None, flag: str) -> str | None:
    """A file written at the end of a long run, checked first so the run cannot end in a crash that loses it."""
    if path is not None and os.path.isdir(path):
        raise StandError(f"{flag} {path} is a directory; give a file path")
    return path


def load(model: str | None, backend: str, dtype: str, forward: str = "auto"):
    """The model on the chosen backend."""
    from stand.backends.load import load_model

    return load_model(model, dtype, backend, forward)


def user_errors(fn):
    """A StandError becomes `error: ...` on stderr and exit code 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StandError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)

    return wrapper


@contextlib.contextmanager
def sigterm_interrupts():
    """Within: SIGTERM (a `kill`, a `timeout`) raises KeyboardInterrupt as Ctrl-C does, so finished work is kept."""
    import signal

    before = signal.signal(signal.SIGTERM, signal.default_int_handler)  # it raises KeyboardInterrupt
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@app.command("generate")
@user_errors
def generate_cmd(
    prompt: str = typer.Argument(..., help="The prompt (wrapped in the model's chat template)"),
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    method: MethodOpt = "none",
    n: int = typer.Option(1, "--n", help="Samples per prompt"),
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    max_new_tokens: MaxNewOpt = 256,
    seed: SeedOpt = None,
    tree: TreeOpt = None,
    table: TableOpt = None,
    cost: CostOpt = None,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text"),
):
    """Generate text and print one line of stats."""
    from stand.api import check_prompts, generate

    check_prompts([prompt], n)
    params, spec = sampling(temperature, top_p, top_k, max_new_tokens, seed), speculation(method, tree, table, cost)
    target = load(model, backend, dtype)
    samples = generate(prompt, target, params=params, spec=spec, n=n)[0]
    if as_json:
        typer.echo(json.dumps([s.__dict__ for s in samples], indent=2))
        return
    for s in samples:
        if n > 1:
            typer.echo(f"--- sample {s.index}")
        typer.echo(s.text)
        st = s.stats
        typer.echo(f"[{spec.method} on {target.kind}] {st['new_tokens']} tokens in {st['seconds']:.2f}s "
                   f"({st['new_tokens'] / max(st['seconds'], 1e-9):.1f} tok/s), {st['forward_passes']} forward passes, "
                   f"{st['mean_accepted']:.2f} tokens/step, drafting {st['draft_seconds']:.3f}s", err=True)


@app.command("bench")
@user_errors
def bench_cmd(
    methods: str = typer.Option("none,pld", "--methods", help="Comma-separated methods (plus the anchors hf, hf-pld, hf-batched, llama.cpp, llama.cpp-pld, vllm, vllm-ngram, vllm-suffix, vllm-stand, vllm-consensus, vllm-ngrammys)"),
    dataset: str = typer.Option("champ", "--dataset"),
    problems: int = typer.Option(4, "--problems"),
    first: int = typer.Option(0, "--first", help="Index of the first problem"),
    n: str = typer.Option("1", "--n", help="Samples per problem; comma-separated for several, e.g. 1,8"),
    schedules: str = typer.Option("batched", "--schedule", help="For n > 1: batched, sequential or both (comma-separated)"),
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    max_new_tokens: MaxNewOpt = 256,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    tree: TreeOpt = None,
    table: TableOpt = None,
    cost: CostOpt = None,
    json_path: JsonOpt = None,
    repeats: int = typer.Option(1, "--repeats", help="Run every problem R times: median tok/s and its min-max"),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write PNG figures into this directory"),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One short untimed run of every row first"),
):
    """Methods and Hugging Face anchors side by side on the same problems, interleaved; a table, JSON, plots."""
    from rich.console import Console

    from stand.lab.bench import BenchConfig
    from stand.lab.report import rich_table, write_rows

    cfg = BenchConfig(_names(methods), dataset, problems, _int_list(n, "--n"),
                      sampling(temperature, top_p, top_k, max_new_tokens, seed), speculation("none", tree, table, cost),
                      _names(schedules), repeats, warmup, first, model).validate()
    json_path = out_file(json_path, "--json")
    rows = _bench_with_bar(load(model, backend, dtype), cfg)
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


@app.command("profile")
@user_errors
def profile_cmd(
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    cache_len: int = typer.Option(500, "--cache-len", help="Tokens already in the cache"),
    reps: int = typer.Option(10, "--reps", help="Timed forwards per size (median reported)"),
    json_path: JsonOpt = None,
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)"),
    grid_path: Optional[str] = typer.Option(None, "--grid", help="Also measure ours over rows x tokens per row and write that cost grid (JSON) here"),
):
    """Milliseconds per forward by new tokens (1..64) and by batch (4, 8, 16 rows), ours beside Hugging Face."""
    import torch

    from stand.core.files import write_json
    from stand.lab.profile import ProfileConfig, as_json, cost_curves, ours, profile_targets, remeasure, table_lines

    if cache_len < 1 or reps < 1 or (threads is not None and threads < 1):
        raise StandError("--cache-len, --reps and --threads must be at least 1")
    if threads:
        torch.set_num_threads(threads)
    if dtype == "auto":  # the dtype stand decodes with here (measured the first time)
        dtype = str(load(model, backend, dtype).dtype).replace("torch.", "")
    target = load(model, backend, dtype, forward="hf")
    curves = cost_curves(profile_targets(target), ProfileConfig(cache_len=cache_len, reps=reps),
                         progress=lambda msg: typer.echo(f"  {msg}", err=True))
    typer.echo(f"ms per forward, {target.name} on {target.kind}, {target.dtype}, cache {cache_len}, median of {reps}, "
               f"{torch.get_num_threads()} threads")
    for line in table_lines(curves):
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
    temperature: TemperatureOpt = 0.6,
    max_new_tokens: MaxNewOpt = 128,
    cost: Optional[str] = typer.Option(None, "--cost", help="Cost grid from `stand profile --grid` or curve from `--json` (default: measure now)"),
    max_m: int = typer.Option(160, "--max-m", help="Largest tree size considered"),
    counts: Optional[str] = typer.Option(None, "--counts", help="Decode nothing: choose M again from the counts in this calibrated tree file (with --cost)"),
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
):
    """Calibrate STAND's draft tree: count accepted nodes of a 600-node template, keep the best M for this machine."""
    from tqdm import tqdm

    from stand.lab.calibrate import CalibrateConfig, calibrate, calibration_prompts, save

    params = sampling(temperature, max_new_tokens=max_new_tokens)
    cfg = CalibrateConfig(dataset, problems, first, temperature=params.temperature,
                          max_new_tokens=params.max_new_tokens, max_m=max_m, cost_curve=cost)
    target = load(model, backend, dtype)
    if counts:
        from stand.core.budget import CostGrid
        from stand.lab.calibrate import recount
        from stand.backends.protocol import pads
        from stand.machine import machine_grid

        cal, cfg = recount(counts, (CostGrid.load(cost) if cost else machine_grid(target)).with_padding(pads(target)))
    else:
        prompts = calibration_prompts(target, cfg)
        with tqdm(total=len(prompts), desc="calibrate", unit="problem", file=sys.stderr) as bar:
            cal = calibrate(target, prompts, cfg, progress=bar.update)
    plot = plot or (out.rsplit(".", 1)[0] + ".png")
    meta = save(cal, target, cfg, out, plot)
    typer.echo(f"M = {cal.m} nodes: {meta['expected_accepted']:.2f} tokens/step, {meta['expected_tokens_per_s']:.1f} tok/s "
               f"expected, from {cal.steps} steps; wrote {out} (the best {len(cal.tree)} nodes with their counts) and {plot}")


@app.command("serve", help=serve_help())
@user_errors
def serve_cmd(
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    method: MethodOpt = "stand",
    host: str = typer.Option("127.0.0.1", "--host", help="Listen here (not loopback without --api-key: a warning)"),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="STAND_API_KEY", help="Every request must send Authorization: Bearer KEY (/health excepted)"),
    table: Optional[str] = typer.Option(None, "--table", help="n-gram table file shared by all requests: loaded at start, saved on shutdown"),
    share_table: bool = typer.Option(False, "--share-table", help="One drafter table for every request (a warm server drafts better)"),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting for room beyond this get 429"),
    default_max_tokens: int = typer.Option(512, "--default-max-tokens", help="max_tokens of a request that gives none"),
    max_tokens_limit: int = typer.Option(4096, "--max-tokens-limit", help="The most max_tokens a request may ask for"),
    max_n: int = typer.Option(16, "--max-n", help="The most samples per request (n, times the prompts of a completions request)"),
    max_prompt_tokens: int = typer.Option(4096, "--max-prompt-tokens", help="The longest prompt, in tokens (over the model's context: 413)"),
    max_live_rows: int = typer.Option(64, "--max-live-rows", help="Rows decoding at once; requests beyond wait in the queue"),
    max_live_tokens: Optional[int] = typer.Option(None, "--max-live-tokens", help="KV tokens running requests may reserve (prompts + n x max_tokens); default: the llama.cpp cache's size, unbounded on torch"),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="The largest request body (beyond: 413)"),
    engine: str = typer.Option("stand", "--engine", help="stand | vllm: `vllm serve` with stand's proposer (scripts/setup-vllm.sh; README: Scale out)"),
):
    if engine != "stand":  # this process becomes `vllm serve`
        from stand.integrations.vllm.launch import serve_vllm
        return serve_vllm(model, method, host, port, dtype, api_key, table, share_table, engine)
    from stand.server.app import ServerConfig, serve

    serve(ServerConfig(model=model, method=method, backend=backend, dtype=dtype, host=host, port=port,
                       api_key=api_key, table=table, share_table=share_table, max_queue=max_queue,
                       default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit, max_n=max_n,
                       max_prompt_tokens=max_prompt_tokens, max_live_rows=max_live_rows,
                       max_live_tokens=max_live_tokens, max_body_bytes=max_body_bytes).validate())


@app.command("convert")
@user_errors
def convert_cmd(gguf: str = typer.Argument(..., help="A .gguf model file"), out: str = typer.Argument(..., help="A new or empty directory (--to hf); a new .gguf file (else)"),
                to: str = typer.Option("hf", "--to", help="hf: a Hugging Face directory (float32) for vLLM | bf16, f16, q8_0, f32: a GGUF file re-encoded by llama.cpp")):
    """A Hugging Face model directory (float32 weights, tokenizer) from a GGUF file, for vLLM; or the GGUF re-encoded."""
    from stand.backends.convert import convert

    typer.echo(f"wrote {convert(gguf, out, to)}")


@app.command("solve")
@user_errors
def solve_cmd(
    question: Optional[str] = typer.Argument(None, help="One question (else --dataset or --jsonl)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="champ | humaneval | arithmetic[:LEVEL[:SEED]]"),
    jsonl: Optional[str] = typer.Option(None, "--jsonl", help='A file of {"prompt": ..., "answer": ...} lines'),
    problems: Optional[int] = typer.Option(None, "--problems", help="How many problems (default: all)"),
    answer: Optional[str] = typer.Option(None, "--answer", help="Reference answer of the single question"),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="Put before each prompt (default per dataset)"),
    n: int = typer.Option(8, "--n", help="Samples per question"),
    strategy: str = typer.Option("self-consistency", "--strategy", help="self-consistency | best-of-n"),
    schedule: str = typer.Option("auto", "--schedule", help="batched | sequential | auto (k samples at a time, k from this machine's cost grid)"),
    method: MethodOpt = "none",
    temperature: TemperatureOpt = 0.6,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    max_new_tokens: MaxNewOpt = 512,
    seed: SeedOpt = 0,
    tree: TreeOpt = None,
    table: TableOpt = None,
    cost: CostOpt = None,
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_path: JsonOpt = None,
):
    """N samples per question; the voted (or best-scored) answer, checked against the reference.
    A Ctrl-C or SIGTERM keeps the questions finished: their lines, the summary and --json, then exit 130."""
    from stand.tts.problems import choose
    from stand.tts.report import TokenBar, solution_line, summary_lines, write_json
    from stand.tts.solve import SolveConfig, iter_solve

    items = choose(question, dataset, jsonl, problems, answer, instruction)
    config, json_path = SolveConfig(n, strategy, schedule).validate(), out_file(json_path, "--json")
    params, spec = sampling(temperature, top_p, top_k, max_new_tokens, seed), speculation(method, tree, table, cost)
    done, interrupted = [], False
    try:
        with sigterm_interrupts(), contextlib.closing(TokenBar(len(items), n * max_new_tokens)) as bar:
            for i, sol in enumerate(iter_solve(items, model, params=params, spec=spec, config=config,
                                               backend=backend, dtype=dtype, progress=bar.update)):
                bar.close()
                done.append(sol)
                typer.echo(solution_line(i, len(items), sol))
    except KeyboardInterrupt:
        interrupted = True
    if json_path:  # files first: a Ctrl-C may also have closed the pipe behind stdout
        write_json(done, json_path, {"method": method, "n": n, "strategy": strategy, "temperature": temperature,
                                     "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed,
                                     "questions": len(items), "interrupted": interrupted})
    for line in summary_lines(done, method):
        typer.echo(line)
    if interrupted:
        typer.echo(f"interrupted: {len(done)} of {len(items)} questions finished", err=True)
        raise typer.Exit(130)


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StandError(f"{name} must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise StandError(f"{name} values must be >= 1, got {text!r}")
    return values


def main() -> None:
    app()


if __name__ == "__main__":
    main()
