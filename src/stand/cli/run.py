"""`stand generate` and `stand solve`: text from the command line, and test-time scaling over questions."""

from __future__ import annotations

import contextlib
import json
from typing import Optional

import typer

from stand.cli.common import (BackendOpt, CostOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxNewOpt, MethodOpt, ModelOpt,
                              RoundsOpt, SeedOpt, StepDelimiterOpt, StepTokensOpt, TableOpt, TemperatureOpt, TopKOpt,
                              TopPOpt, TreeOpt, WidthOpt, app, load, out_file, sampling, search_config, sigterm_interrupts,
                              speculation, user_errors)


@app.command("generate")
@user_errors
def generate_cmd(
    prompt: str = typer.Argument(..., help="The prompt (wrapped in the model's chat template)"),
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
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
    target = load(model, backend, dtype, device=device, method=spec.method)
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



@app.command("solve")
@user_errors
def solve_cmd(
    question: Optional[str] = typer.Argument(None, help="One question (else --dataset or --jsonl)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="champ | humaneval | arithmetic[:LEVEL[:SEED]]"),
    jsonl: Optional[str] = typer.Option(None, "--jsonl", help='A file of {"prompt": ..., "answer": ...} lines'),
    problems: Optional[int] = typer.Option(None, "--problems", help="How many problems (default: all)"),
    answer: Optional[str] = typer.Option(None, "--answer", help="Reference answer of the single question"),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="Put before each prompt (default per dataset)"),
    n: int = typer.Option(8, "--n", help="Samples per question (beam, dvts: candidates per round)"),
    strategy: str = typer.Option("self-consistency", "--strategy", help="self-consistency | best-of-n | beam | dvts"),
    width: WidthOpt = 4,
    step_delimiter: StepDelimiterOpt = "\\n\\n",
    step_tokens: StepTokensOpt = 128,
    rounds: RoundsOpt = 32,
    scorer: Optional[str] = typer.Option(None, "--scorer", help="beam, dvts: a Hugging Face sequence-classification (reward) model directory that scores steps (default: the step's mean token log-probability)"),
    answer_by: str = typer.Option("vote", "--answer-by", help="beam, dvts: vote (weighted by score) | best"),
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
    device: DeviceOpt = "auto",
    json_path: JsonOpt = None,
):
    """N samples per question; the voted (or best-scored) answer, checked against the reference.
    A Ctrl-C or SIGTERM keeps the questions finished: their lines, the summary and --json, then exit 130."""
    from stand.tts.problems import choose
    from stand.tts.report import TokenBar, solution_line, summary_lines, write_json
    from stand.tts.solve import SolveConfig, iter_solve

    items = choose(question, dataset, jsonl, problems, answer, instruction)
    search = search_config(width, step_delimiter, step_tokens, rounds, answer_by)
    config = SolveConfig(n, strategy, schedule, scorer=scorer, search=search).with_scorer()  # a reward model loads now
    json_path = out_file(json_path, "--json")
    params, spec = sampling(temperature, top_p, top_k, max_new_tokens, seed), speculation(method, tree, table, cost)
    done, interrupted = [], False
    target = load(model, backend, dtype, device=device, method=spec.method)
    try:
        with sigterm_interrupts(), contextlib.closing(TokenBar(len(items), n * max_new_tokens)) as bar:
            for i, sol in enumerate(iter_solve(items, target, params=params, spec=spec, config=config,
                                               progress=bar.update, on_round=bar.round)):
                bar.close()
                done.append(sol)
                typer.echo(solution_line(i, len(items), sol))
    except KeyboardInterrupt:
        interrupted = True
    if json_path:  # files first: a Ctrl-C may also have closed the pipe behind stdout
        searched = {"width": width, "step_delimiter": search.delimiter, "step_tokens": step_tokens, "rounds": rounds,
                    "scorer": scorer or "mean-logprob", "answer_by": answer_by} if config.searches else {}
        write_json(done, json_path, {"method": method, "n": n, "strategy": strategy, "temperature": temperature,
                                     "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed,
                                     "questions": len(items), "interrupted": interrupted} | searched)
    for line in summary_lines(done, method):
        typer.echo(line)
    if interrupted:
        typer.echo(f"interrupted: {len(done)} of {len(items)} questions finished", err=True)
        raise typer.Exit(130)

