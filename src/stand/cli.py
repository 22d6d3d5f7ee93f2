"""The `stand` command (typer). User mistakes print one line and exit 2."""

from __future__ import annotations

import functools
import json
import sys
from typing import Optional

import typer

from stand.errors import StandError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Lossless model-free speculative decoding for test-time scaling.")

ModelOpt = typer.Option(None, "--model", "-m", help="Hugging Face model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
CostOpt = typer.Option(None, "--cost", help="Cost grid JSON (`stand profile --grid`) that sizes each row's tree; default: the tree's own; off: a fixed share of each pass")
DtypeOpt = typer.Option("auto", "--dtype", help="auto | bfloat16 | float32 (auto: bfloat16 where the CPU has native bf16)")


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


@app.command("generate")
@user_errors
def generate_cmd(
    prompt: str = typer.Argument(..., help="The prompt (wrapped in the model's chat template)"),
    model: Optional[str] = ModelOpt,
    method: str = typer.Option("none", "--method", help="none | pld | stand | recycle | consensus | ngrammys | ..."),
    n: int = typer.Option(1, "--n", help="Samples per prompt"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dtype: str = DtypeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text"),
    tree: Optional[str] = typer.Option(None, "--tree", help="STAND: a draft tree JSON from `stand calibrate` (default: the shipped one)"),
    table: Optional[str] = typer.Option(None, "--table", help="STAND: n-gram table file, loaded at start and saved at the end"),
    cost: Optional[str] = CostOpt,
):
    """Generate text and print one line of stats."""
    from stand.api import generate
    from stand.params import SamplingParams, SpecConfig

    SamplingParams(temperature, top_p, top_k, max_new_tokens, seed).validate()  # fail before loading the model
    samples = generate(prompt, model=model, n=n, method=method, temperature=temperature, top_p=top_p, top_k=top_k,
                       max_new_tokens=max_new_tokens, seed=seed, dtype=dtype,
                       spec=SpecConfig(method=method, tree=tree, table_path=table, cost_grid=cost))[0]
    if as_json:
        typer.echo(json.dumps([s.__dict__ for s in samples], indent=2))
        return
    for s in samples:
        if n > 1:
            typer.echo(f"--- sample {s.index}")
        typer.echo(s.text)
        st = s.stats
        typer.echo(f"[{method}] {st['new_tokens']} tokens in {st['seconds']:.2f}s "
                   f"({st['new_tokens'] / max(st['seconds'], 1e-9):.1f} tok/s), {st['forward_passes']} forward passes, "
                   f"{st['mean_accepted']:.2f} tokens/step, drafting {st['draft_seconds']:.3f}s", err=True)


@app.command("bench")
@user_errors
def bench_cmd(
    methods: str = typer.Option("none,pld", "--methods", help="Comma-separated methods (plus hf, hf-pld, hf-batched)"),
    dataset: str = typer.Option("champ", "--dataset"),
    problems: int = typer.Option(4, "--problems"),
    first: int = typer.Option(0, "--first", help="Index of the first problem"),
    n: str = typer.Option("1", "--n", help="Samples per problem; comma-separated for several, e.g. 1,8"),
    schedules: str = typer.Option("batched", "--schedule", help="For n > 1: batched, sequential or both (comma-separated)"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the rows as JSON"),
    repeats: int = typer.Option(1, "--repeats", help="Run every problem R times: median tok/s and its min-max"),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write PNG figures into this directory"),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One short untimed run of every row first"),
    table: Optional[str] = typer.Option(None, "--table", help="STAND rows: n-gram table file loaded at start, saved at the end (a warm start for the next run)"),
    cost: Optional[str] = CostOpt,
):
    """Methods and Hugging Face anchors side by side on the same problems, interleaved; a table, JSON, plots."""
    from rich.console import Console

    from stand.lab.bench import BenchConfig, rich_table, write_json
    from stand.backends.load import load_model
    from stand.params import SamplingParams

    cfg = BenchConfig([m.strip() for m in methods.split(",") if m.strip()], dataset, problems, _int_list(n, "--n"),
                      temperature, max_new_tokens, seed, [s.strip() for s in schedules.split(",") if s.strip()],
                      repeats, warmup, table, cost, first).validate()
    SamplingParams(temperature, max_new_tokens=max_new_tokens).validate()
    target = load_model(model, dtype)
    rows = _bench_with_bar(target, cfg)
    if json_path:  # files first: a Ctrl-C may also have closed the pipe behind stdout
        write_json(rows, json_path)
    if plot:
        from stand.lab.plots import plot_all

        for path in plot_all(rows, plot):
            typer.echo(f"wrote {path}", err=True)
    Console(width=None if sys.stdout.isatty() else 160).print(rich_table(rows))  # a log file keeps every column
    if not rows or rows[0]["interrupted"]:
        typer.echo("interrupted: the rows cover the problems that every method finished", err=True)
        raise typer.Exit(130)


def _bench_with_bar(target, cfg) -> list[dict]:
    import signal

    from tqdm import tqdm

    from stand.lab.bench import bench

    def stop(*_):
        raise KeyboardInterrupt  # a `kill` or `timeout` keeps the finished rows, as a Ctrl-C does

    before = signal.signal(signal.SIGTERM, stop)
    try:
        with tqdm(total=cfg.repeats * cfg.problems * len(cfg.variants()), desc="bench", unit="run", file=sys.stderr) as bar:
            def progress(label: str, done: bool) -> None:
                if not done and bar.n == 0 and not label.startswith("warm-up"):
                    bar.reset()  # the rate and the time left count from the first timed run
                bar.update(1) if done else bar.set_postfix_str(label)

            return bench(target, cfg, progress=progress)
    finally:
        signal.signal(signal.SIGTERM, before)


@app.command("profile")
@user_errors
def profile_cmd(
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    cache_len: int = typer.Option(500, "--cache-len", help="Tokens already in the cache"),
    reps: int = typer.Option(10, "--reps", help="Timed forwards per size (median reported)"),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the curves as JSON"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)"),
    grid_path: Optional[str] = typer.Option(None, "--grid", help="Also measure ours over rows x tokens per row and write that cost grid (JSON) here"),
):
    """Milliseconds per forward by new tokens (1..64) and by batch (4, 8, 16 rows), ours beside Hugging Face."""
    import torch

    from stand.lab.profile import ProfileConfig, as_json, cost_curves, profile_targets, table_lines
    from stand.backends.load import load_model

    if cache_len < 1 or reps < 1 or (threads is not None and threads < 1):
        raise StandError("--cache-len, --reps and --threads must be at least 1")
    if threads:
        torch.set_num_threads(threads)
    target = load_model(model, dtype, backend="torch", forward="hf")
    curves = cost_curves(profile_targets(target), ProfileConfig(cache_len=cache_len, reps=reps),
                         progress=lambda msg: typer.echo(f"  {msg}", err=True))
    typer.echo(f"ms per forward, {target.name}, {target.dtype}, cache {cache_len}, median of {reps}, "
               f"{torch.get_num_threads()} threads")
    for line in table_lines(curves):
        typer.echo(line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(as_json(curves), f, indent=2)
    if grid_path:
        from stand.backends.lean import with_forward
        from stand.lab.profile import measure_grid

        grid = measure_grid(with_forward(target, "auto"), reps=reps, progress=lambda msg: typer.echo(f"  grid: {msg}", err=True))
        grid.save(grid_path)
        typer.echo(f"ms per forward, rows x tokens per row (wrote {grid_path}):")
        for rows, curve in sorted(grid.ms.items()):
            typer.echo(f"{rows:>3} rows: " + "  ".join(f"{t}:{ms:.0f}" for t, ms in sorted(curve.items())))


@app.command("calibrate")
@user_errors
def calibrate_cmd(
    dataset: str = typer.Option("champ", "--dataset"),
    problems: int = typer.Option(4, "--problems", help="Calibration problems (the first K of the dataset)"),
    first: int = typer.Option(0, "--first", help="Index of the first calibration problem"),
    out: str = typer.Option("tree.json", "--out", help="Where to write the tree JSON"),
    plot: Optional[str] = typer.Option(None, "--plot", help="PNG of accepted tokens and tok/s against M (default: OUT with .png)"),
    temperature: float = typer.Option(0.6, "--temperature", "-t"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    cost: Optional[str] = typer.Option(None, "--cost", help="Cost grid from `stand profile --grid` or curve from `--json` (default: measure now)"),
    max_m: int = typer.Option(160, "--max-m", help="Largest tree size considered"),
    counts: Optional[str] = typer.Option(None, "--counts", help="Decode nothing: choose M again from the counts in this calibrated tree file (with --cost)"),
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
):
    """Calibrate STAND's draft tree: count accepted nodes of a 600-node template, keep the best M for this machine."""
    from tqdm import tqdm

    from stand.lab.calibrate import CalibrateConfig, calibrate, calibration_prompts, save
    from stand.backends.load import load_model
    from stand.params import SamplingParams

    SamplingParams(temperature, max_new_tokens=max_new_tokens).validate()
    cfg = CalibrateConfig(dataset, problems, first, temperature=temperature, max_new_tokens=max_new_tokens,
                          max_m=max_m, cost_curve=cost)
    target = load_model(model, dtype)
    if counts:
        from stand.core.budget import CostGrid
        from stand.lab.profile import measure_grid
        from stand.lab.calibrate import recount

        cal, cfg = recount(counts, CostGrid.load(cost) if cost else measure_grid(target))
    else:
        prompts = calibration_prompts(target, cfg)
        with tqdm(total=len(prompts), desc="calibrate", unit="problem", file=sys.stderr) as bar:
            cal = calibrate(target, prompts, cfg, progress=bar.update)
    plot = plot or (out.rsplit(".", 1)[0] + ".png")
    meta = save(cal, target, cfg, out, plot)
    typer.echo(f"M = {cal.m} nodes: {meta['expected_accepted']:.2f} tokens/step, {meta['expected_tokens_per_s']:.1f} tok/s "
               f"expected, from {cal.steps} steps; wrote {out} (the best {len(cal.tree)} nodes with their counts) and {plot}")


@app.command("serve")
@user_errors
def serve_cmd(
    model: Optional[str] = ModelOpt,
    method: str = typer.Option("stand", "--method", help="Drafter: none | pld | stand | recycle | consensus | ..."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="STAND_API_KEY", help="Every request must send Authorization: Bearer KEY (/health excepted)"),
    table: Optional[str] = typer.Option(None, "--table", help="n-gram table file shared by all requests: loaded at start, saved on shutdown"),
    share_table: bool = typer.Option(False, "--share-table", help="One drafter table for every request (a warm server drafts better)"),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting beyond this get 429"),
    batch_window_ms: float = typer.Option(50.0, "--batch-window-ms", help="Wait this long for requests to batch together"),
    max_n: int = typer.Option(16, "--max-n", help="Largest n a request may ask for"),
    dtype: str = DtypeOpt,
):
    """OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)."""
    from stand.server.app import ServerConfig, serve

    serve(ServerConfig(model=model, method=method, dtype=dtype, host=host, port=port, api_key=api_key, table=table,
                       share_table=share_table, max_queue=max_queue, batch_window_ms=batch_window_ms,
                       max_n=max_n).validate())


@app.command("solve")
@user_errors
def solve_cmd(
    question: Optional[str] = typer.Argument(None, help="One question (else --dataset or --jsonl)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="champ | humaneval"),
    jsonl: Optional[str] = typer.Option(None, "--jsonl", help='A file of {"prompt": ..., "answer": ...} lines'),
    problems: Optional[int] = typer.Option(None, "--problems", help="How many problems (default: all)"),
    answer: Optional[str] = typer.Option(None, "--answer", help="Reference answer of the single question"),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="Put before each prompt (default per dataset)"),
    n: int = typer.Option(8, "--n", help="Samples per question"),
    strategy: str = typer.Option("self-consistency", "--strategy", help="self-consistency | best-of-n"),
    method: str = typer.Option("none", "--method"),
    schedule: str = typer.Option("auto", "--schedule", help="batched | sequential | auto (measured once, cached)"),
    temperature: float = typer.Option(0.6, "--temperature", "-t"),
    top_p: float = typer.Option(1.0, "--top-p"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = ModelOpt,
    dtype: str = DtypeOpt,
    json_path: Optional[str] = typer.Option(None, "--json", help="Write every sample as JSON"),
):
    """N samples per question; the voted (or best-scored) answer, checked against the reference."""
    from tqdm import tqdm

    from stand.tts import solve as tts
    from stand.params import SamplingParams

    items = _solve_problems(question, dataset, jsonl, problems, answer, instruction)
    tts.SolveConfig(n, strategy, schedule).validate()
    SamplingParams(temperature, top_p, 0, max_new_tokens, seed).validate()
    bar, done = None, []

    def progress(i: int, k: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=n * max_new_tokens, desc=f"{i + 1}/{len(items)}", unit="tok", file=sys.stderr, leave=False)
        bar.update(k)

    for i, sol in enumerate(tts.iter_solve(items, model, n, strategy, method, None, None, schedule, temperature,
                                           top_p, 0, max_new_tokens, seed, dtype, progress=progress)):
        if bar is not None:
            bar.close()
            bar = None
        done.append(sol)
        typer.echo(tts.solution_line(i, len(items), sol))
    for line in tts.summary_lines(done, method):
        typer.echo(line)
    if json_path:
        tts.write_json(done, json_path, {"method": method, "n": n, "strategy": strategy, "temperature": temperature,
                                         "max_new_tokens": max_new_tokens, "seed": seed})


def _solve_problems(question, dataset, jsonl, problems, answer, instruction) -> list:
    from stand.tts.problems import MATH_INSTRUCTION, jsonl as jsonl_problems, load_dataset
    from stand.tts.problems import question as one_question

    if sum(x is not None for x in (question, dataset, jsonl)) != 1:
        raise StandError("give exactly one of: a QUESTION, --dataset NAME, --jsonl FILE")
    kw = {} if instruction is None else {"instruction": instruction}
    if question is not None:
        return [one_question(question, kw.get("instruction", MATH_INSTRUCTION), answer)]
    if jsonl is not None:
        return jsonl_problems(jsonl, problems, **kw)  # prompts as written unless --instruction
    return load_dataset(dataset, problems, **kw)


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
