"""What the commands share: the typer app, flags declared once (each command gives its own default) and mapped
onto SamplingParams by `sampling` and onto SpecConfig by `speculation`, and the rule that a user mistake prints one
line and exits 2."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Annotated, Optional

import typer

from stand.errors import StandError
from stand.methods import names as method_names
from stand.params import SamplingParams, SpecConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Lossless model-free speculative decoding for test-time scaling.")

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hugging Face model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")]
BackendOpt = Annotated[str, typer.Option("--backend", help="auto | torch | llama.cpp (auto: the fastest here for this file, measured once and cached; it says which ran and why)")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="torch backend: auto | bfloat16 | float32 | int4 (int4: a GGUF's own 4-bit blocks, other weights quantised on load; auto: the fastest here, measured once and cached)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch backend: auto | cpu | cuda (auto: CUDA when torch sees a GPU)")]
MethodOpt = Annotated[str, typer.Option("--method", help=" | ".join(method_names()))]
TemperatureOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy")]
TopPOpt = Annotated[float, typer.Option("--top-p")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="0 = off")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed")]
TreeOpt = Annotated[Optional[str], typer.Option("--tree", help="STAND: a draft tree JSON from `stand calibrate` (default: the shipped one)")]
TableOpt = Annotated[Optional[str], typer.Option("--table", help="STAND: n-gram table file, loaded at start and saved at the end (a warm start for the next run)")]
CostOpt = Annotated[Optional[str], typer.Option("--cost", help="What a pass costs, which sizes each row's tree: default this machine's grid (measured once, cached); a grid JSON (`stand profile --grid`); tree: the calibrated tree's; off: a fixed share of each pass")]
NodesOpt = Annotated[Optional[int], typer.Option("--nodes", help="Ask every row for exactly this many draft nodes each step (an equal budget for comparing methods: no cost sizing, no cap per pass; chains draft up to this many tokens)")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="Write the results to this JSON file")]
WidthOpt = Annotated[int, typer.Option("--width", help="beam: live beams kept; dvts: steps per subtree and round (n/width subtrees); must divide n")]
StepDelimiterOpt = Annotated[str, typer.Option("--step-delimiter", help="beam, dvts: a step ends with this text (backslash escapes read)")]
StepTokensOpt = Annotated[int, typer.Option("--step-tokens", help="beam, dvts: most tokens per step")]
RoundsOpt = Annotated[int, typer.Option("--rounds", help="beam, dvts: most steps per beam")]


def sampling(temperature: float, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256,
             seed: int | None = None) -> SamplingParams:
    """The sampling flags as SamplingParams, checked (before any model is loaded)."""
    return SamplingParams(temperature, top_p, top_k, max_new_tokens, seed).validate()


def speculation(method: str = "none", tree: str | None = None, table: str | None = None, cost: str | None = None,
                nodes: int | None = None) -> SpecConfig:
    """The drafting flags as a SpecConfig, checked (before any model is loaded): a --table PATH that is a directory
    or a file other than a stand table is refused now, not overwritten or crashed on after decoding; a --cost grid
    and a --tree file are read once to check them. With --nodes no pass is capped (every row gets its nodes however
    many rows run)."""
    if table is not None:
        from stand.drafters.ngram_table import check_table_path

        check_table_path(table)
    if cost not in (None, "off", "tree"):
        from stand.core.cost import CostGrid

        CostGrid.load(cost)
    if tree is not None:
        from stand.drafters.templates import TreeTemplate

        TreeTemplate.load(tree)
    spec = SpecConfig(method=method, tree=tree, table_path=table, cost_grid=cost, nodes=nodes)
    if nodes is not None:
        spec.step_tokens = None
    return spec.validate()


def search_config(width: int, step_delimiter: str, step_tokens: int, rounds: int, answer_by: str = "vote"):
    """The tree-search flags as a SearchConfig (checked against n when the strategy is known)."""
    from stand.tts.search import SearchConfig

    return SearchConfig(width, unescape(step_delimiter), step_tokens, rounds, answer_by)


def unescape(text: str) -> str:
    """Backslash escapes typed on a command line (\\n, \\t, \\\\) read as the characters they stand for."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise StandError(f"--step-delimiter {text!r} has a broken backslash escape ({e.reason})") from None


def out_file(path: str | None, flag: str) -> str | None:
    """A file written at the end of a long run, checked first so the run cannot end in a crash that loses it."""
    if path is not None and os.path.isdir(path):
        raise StandError(f"{flag} {path} is a directory; give a file path")
    return path


def load(model: str | None, backend: str, dtype: str, forward: str = "auto", device: str = "auto",
         method: str = "stand"):
    """The model on the chosen backend; where backend or dtype is auto, one line on stderr says which engine ran and
    why (measured with `method` drafting the first time)."""
    if forward != "auto":
        from stand.backends.load import load_model

        return load_model(model, dtype, backend, forward, device)
    from stand.api import load_target

    target = load_target(model, backend, dtype, device, method)
    if getattr(target, "choice", None):
        typer.echo(f"[{target.choice}]", err=True)
    return target


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


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StandError(f"{name} must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise StandError(f"{name} values must be >= 1, got {text!r}")
    return values
