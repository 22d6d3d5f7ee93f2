"""The Python API: stand.generate, and the pieces solve and the server build on (targets, rows, engines)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stand.backends.load import load_model
from stand.backends.protocol import Backend as Target
from stand.core.cost import resolve_grid
from stand.core.drafter import Drafter
from stand.core.sequence import OnCommit, Row
from stand.drafters.registry import make_drafter
from stand.engine import Engine
from stand.backends.machine import machine_grid
from stand.errors import StandError
from stand.params import SamplingParams, SpecConfig

SCHEDULES = ("batched", "sequential")  # how the n samples of a prompt run: all at once, or one after another
AUTO = "auto"  # as many at once as this machine's cost grid and the drafter's curve say is fastest (Sizer.best_live)


def check_schedule(schedule: str) -> str:
    """The one check of a schedule name."""
    choices = SCHEDULES + (AUTO,)
    if schedule not in choices:
        raise StandError(f"schedule must be one of {', '.join(choices)}, got {schedule!r}")
    return schedule


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)
    prompt_index: int = 0
    index: int = 0


def resolve_target(model: Target | str | None, backend: str = "auto", dtype: str = "auto") -> Target:
    """A loaded backend: `model` itself, or the model at that path (None: the embedded default) loaded."""
    return load_model(model, dtype, backend) if model is None or isinstance(model, str) else model


def encode_prompts(target: Target, prompts: list[str] | list[list[int]], chat: bool = True) -> list[list[int]]:
    """Token ids per prompt; each checked against the model's context."""
    out = []
    for i, p in enumerate(prompts):
        ids = target.encode(p, chat=chat) if isinstance(p, str) else [int(t) for t in p]
        if len(ids) >= target.max_len:
            raise StandError(f"prompt {i} is {len(ids)} tokens, longer than the model's context of {target.max_len}")
        out.append(ids)
    return out


def check_prompts(prompts: list, n: int) -> None:
    """What can be checked before a model is loaded."""
    if not isinstance(n, int) or n < 1:
        raise StandError(f"n must be an integer >= 1, got {n}")
    for i, p in enumerate(prompts):
        if (isinstance(p, str) and not p.strip()) or len(p) == 0:
            raise StandError(f"prompt {i} is empty")


def build_rows(prompt_ids: list[list[int]], n: int, params: SamplingParams) -> list[list[Row]]:
    """rows[i][j]: sample j of prompt i; the samples of a prompt form one drafter group."""
    return [[Row(ids, params, group=i, index=j) for j in range(n)] for i, ids in enumerate(prompt_ids)]


def make_engine(target: Target, spec: SpecConfig, drafter: Drafter | None = None) -> Engine:
    """The engine for one run: the spec's drafter (built with the target), its pass budget and cost grid."""
    drafter = drafter or make_drafter(spec, target.vocab_size, target)
    return Engine(target, drafter, spec.step_tokens, resolve_grid(spec.cost_grid, drafter, lambda: machine_grid(target)))


def live_rows(engine: Engine, n: int, schedule: str) -> int:
    """How many of a prompt's n samples decode at once under `schedule`."""
    return {"batched": n, "sequential": 1}.get(check_schedule(schedule)) or engine.sizer.best_live(n)


def schedule_label(live: int, n: int) -> str:
    return "batched" if live == n else "sequential" if live == 1 else f"{live} at a time"


def run_group(engine: Engine, rows: list[Row], schedule: str, on_commit: OnCommit | None = None) -> str:
    """The N samples of one prompt: together as one batch, one after another (later ones draft from earlier), or
    (auto) k at a time, k from the cost grid. Returns what ran (schedule_label)."""
    live = live_rows(engine, len(rows), schedule)
    engine.run(rows, on_commit, max_live=live)
    return schedule_label(live, len(rows))


def to_sample(row: Row) -> Sample:
    return Sample(row.text, row.generated, row.finish_reason or "", row.stats.as_dict(), row.group, row.index)


def generate(prompts: str | list[str], model: Target | str | None = None, *,
             params: SamplingParams = SamplingParams(), spec: SpecConfig = SpecConfig(), n: int = 1,
             schedule: str = "batched", chat: bool = True, backend: str = "auto", dtype: str = "auto",
             drafter: Drafter | None = None, on_commit: OnCommit | None = None) -> list[list[Sample]]:
    """Generate n samples per prompt; returns result[prompt][sample] with text, token ids and stats.

    model: a path (None: the embedded default), loaded with `backend` and `dtype`, or a loaded Backend.
    The output is what plain decoding of the model would give (token for token at temperature 0, the
    same distribution when sampling); spec.method only changes how fast it comes.
    """
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not prompts:
        raise StandError("no prompts given")
    check_prompts(prompts, n)
    check_schedule(schedule)
    params, spec = params.validate(), spec.validate()
    target = resolve_target(model, backend, dtype)
    groups = build_rows(encode_prompts(target, prompts, chat), n, params)
    engine = make_engine(target, spec, drafter)
    for rows in groups:
        run_group(engine, rows, schedule, on_commit)
    return [[to_sample(r) for r in rows] for rows in groups]
