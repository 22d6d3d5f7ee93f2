"""One failing step fails only the rows that caused it: a request poisoned so that the backend, the drafter or
the logits fail on its rows gets a 500 in OpenAI's shape, while the requests decoding beside it finish with the
text they would have had alone, and every drafter group is released. The real uvicorn server, the tiny model."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from stand.server import ServerConfig
from tiny import save_tiny
from test_server import healthy, running, wait_until

GOOD = ["Tell me a story about a cat.", "Count to ten, slowly.", "What is two plus two?"]
POISON_AT = 280  # a forward that reaches this position fails (only the poisoned prompt's rows get there)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = save_tiny(str(tmp_path_factory.mktemp("tiny")))
    # float32 pinned: greedy text must not depend on which rows share a pass, and `auto` picks between float32 and
    # bfloat16 by a measurement that can go either way on a loaded machine (bfloat16 rounds by batch shape)
    config = ServerConfig(model=model_dir, method="stand", dtype="float32", max_n=4, max_live_rows=16)
    with running(config) as (base, app):
        wait_until(lambda: healthy(base), 120)
        yield base, app


def ask(base: str, prompt: str, n: int = 2, max_tokens: int = 40) -> httpx.Response:
    body = {"prompt": prompt, "n": n, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(base + "/v1/completions", json=body, timeout=120)


@contextlib.contextmanager
def poisoned(app, how: str):
    """The backend fails on any forward past POISON_AT; or the drafter raises for, or the logits are NaN for, a row
    whose prompt holds the marker "ÿÿÿ"."""
    state = app.state.stand
    target, engine = state.target, state.worker.engine
    marker = target.encode("ÿÿÿ", chat=False)

    def marked(row) -> bool:
        return any(row.prompt[i:i + len(marker)] == marker for i in range(len(row.prompt)))

    if how == "backend":
        forward = target.forward
        target.forward = lambda cache, batch, *a: (
            (_ for _ in ()).throw(RuntimeError("simulated allocation failure")) if int(batch.position_ids.max()) >= POISON_AT
            else forward(cache, batch, *a))
        undo = lambda: delattr(target, "forward")  # noqa: E731
    elif how == "drafter":
        propose = engine.drafter.propose
        engine.drafter.propose = lambda row, *a: (
            (_ for _ in ()).throw(ValueError("simulated drafter bug")) if marked(row) else propose(row, *a))
        undo = lambda: delattr(engine.drafter, "propose")  # noqa: E731
    else:
        verify = engine._verify
        engine._verify = lambda row, tree, logits, learns: verify(
            row, tree, torch.full_like(logits, float("nan")) if marked(row) else logits, learns)
        undo = lambda: delattr(engine, "_verify")  # noqa: E731
    try:
        yield
    finally:
        undo()


CASES = [("backend", "x" * 300), ("backend", "x" * 268), ("drafter", "ÿÿÿ hello"), ("nan", "ÿÿÿ hello")]


@pytest.mark.parametrize("how,prompt", CASES, ids=["backend-at-admission", "backend-mid-decode", "drafter", "nan-logits"])
def test_one_failing_step_fails_only_its_rows(served, how, prompt):
    base, app = served
    alone = [ask(base, p).json()["choices"] for p in GOOD]  # what each good request gives alone
    with poisoned(app, how), ThreadPoolExecutor(4) as pool:
        bad = pool.submit(ask, base, prompt, 2, 60)
        good = [pool.submit(ask, base, p) for p in GOOD]
        bad, good = bad.result(), [g.result() for g in good]
    assert bad.status_code == 500, bad.text
    error = bad.json()["error"]
    assert error["type"] == "server_error" and "simulated" not in error["message"]
    assert [g.status_code for g in good] == [200] * 3
    assert [[c["text"] for c in g.json()["choices"]] for g in good] == [[c["text"] for c in a] for a in alone]
    worker, drafter = app.state.stand.worker, app.state.stand.worker.engine.drafter
    wait_until(lambda: not worker.live and not worker.engine.busy, 30)
    assert not drafter.tables and not drafter.rows  # every drafter group released
    assert "stand_drafter_groups 0" in httpx.get(base + "/metrics").text
    assert healthy(base) and ask(base, GOOD[0]).status_code == 200


def test_one_failing_step_engine_run_still_raises(tiny):
    """Engine.run (generate, solve, bench) finishes the other rows, then raises naming the failure."""
    from stand.core.sequence import Row
    from stand.drafters.none import NoDrafter
    from stand.engine import Engine
    from stand.params import SamplingParams, SpecConfig

    engine = Engine(tiny, NoDrafter(SpecConfig(), tiny.vocab_size))
    verify = engine._verify
    engine._verify = lambda row, tree, logits, learns: verify(
        row, tree, torch.full_like(logits, float("nan")) if row.index == 1 else logits, learns)
    rows = [Row([5, 6, 7], SamplingParams(max_new_tokens=8, ignore_eos=True), index=i) for i in range(3)]
    with pytest.raises(RuntimeError, match="1 of 3 rows failed: FloatingPointError"):
        engine.run(rows)
    assert [r.finish_reason for r in rows] == ["length", "error", "length"] and len(rows[2].generated) == 8
