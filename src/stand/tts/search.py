"""Tree search over reasoning steps: beam search and diverse verifier tree search (DVTS).

A step is what the model writes after a partial solution up to and including the token that completes the step
delimiter (default a blank line), or up to its end-of-sequence token, or `step_tokens` tokens, whichever comes first.
Each round, every live beam is extended by sampled steps, a scorer rates every candidate (tts/scorers.py) and the best
survive:

- beam search (width W): round 1 draws N steps from the question; each later round extends every live beam by N/W
  steps. The best W - F candidates survive (F: beams finished so far), those finished leave the live set for good;
- DVTS: N/W subtrees, each keeping its single best partial solution and extending it by W steps a round, so the
  subtrees never share a beam and stay diverse.

A beam is finished when its last step holds a final answer (default: a \\boxed{} answer), ends the text (end of
sequence) or the beam reaches max_new_tokens or the model's context; after `rounds` rounds the live ones stop too.
The answer comes from the finished beams (beam search: at most W; DVTS: one per subtree), by a vote weighted by score
or by the best score (tts/solve.py).

Every candidate is a row of the continuous-batching engine (the N rows of a round decode as one batch, rows that
share a prefix prefilled once); its prompt is the question followed by its beam's steps so far. Lossless: a step is
drawn from the model given its beam's prefix, token by token as plain sampling would (the engine's verification keeps
every token's distribution the model's), and where a step ends depends only on the tokens drawn so far; tokens a pass
accepted beyond the step's end are dropped, and the next round draws what follows afresh. All rows of a question are
one drafter group, held by the engine from the first round to the last (Engine.hold), so every candidate drafts from
what the earlier rounds and its siblings wrote.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Callable

from stand.core.sequence import Row, stop_index
from stand.engine import Engine
from stand.errors import StandError
from stand.params import SamplingParams
from stand.tts.answers import boxed
from stand.tts.scorers import MEAN_LOGPROB, StepScorer, checked_score

STRATEGIES = ("beam", "dvts")
ANSWER_BY = ("vote", "best")  # the finished beams' answers voted (weighted by score), or the best-scored beam's
Tokens = Callable[[int, int], None]  # (question index, tokens just committed)
Rounds = Callable[[int, int], None]  # (question index, round starting)


def has_final_answer(text: str) -> bool:
    """The default end of a solution: a \\boxed{} answer."""
    return boxed(text) is not None


@dataclass
class SearchConfig:
    """How a tree search grows: its width, what a step is, how many rounds, how the answer is chosen."""

    width: int = 4  # beam search: live beams kept; DVTS: steps drawn per subtree and round (N/width subtrees)
    delimiter: str = "\n\n"  # a step ends with the token that completes it
    step_tokens: int = 128  # most tokens per step
    rounds: int = 32  # most rounds (steps per beam)
    answer_by: str = "vote"  # "vote" (weighted by score) | "best"
    is_final: Callable[[str], bool] = has_final_answer  # a step after which the beam is finished

    def validate(self, n: int) -> "SearchConfig":
        w = self.width
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise StandError(f"width must be an integer >= 1, got {w!r}")
        if w > n:
            raise StandError(f"width {w} is larger than n {n}: it must divide n")
        if n % w:
            raise StandError(f"width {w} does not divide n {n}")
        if not isinstance(self.delimiter, str) or not self.delimiter:
            raise StandError("the step delimiter must be a non-empty string")
        for name in ("step_tokens", "rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StandError(f"{name} must be an integer >= 1, got {value!r}")
        if self.answer_by not in ANSWER_BY:
            raise StandError(f"answer_by must be one of {', '.join(ANSWER_BY)}, got {self.answer_by!r}")
        if not callable(self.is_final):
            raise StandError("is_final must be a callable")
        return self


@dataclass
class Step:
    text: str
    tokens: list[int]
    logprobs: list[float]  # per token, under the model at T=1
    end: str  # "delimiter", "step_tokens", "eos", "stop" (another stop string), "length" (no room left)
    passes: int  # verification passes of the row that drew it
    score: float = 0.0
    row: int | None = None  # the uid of the row that drew it (the next round's rows continue its cached tokens)


@dataclass
class Beam:
    id: int
    parent: int | None  # the beam it extends (None: a root)
    subtree: int  # DVTS: its subtree; beam search: 0
    steps: list[Step] = field(default_factory=list)
    finished: str | None = None  # "answer", "eos", "stop", "length", "rounds"

    @property
    def tokens(self) -> list[int]:
        return [t for s in self.steps for t in s.tokens]

    @property
    def score(self) -> float:
        """The beam's score: the mean of its steps' scores."""
        return sum(s.score for s in self.steps) / len(self.steps) if self.steps else float("-inf")

    def child(self, id: int, step: Step) -> "Beam":
        return Beam(id, self.id, self.subtree, self.steps + [step])


@dataclass
class SearchResult:
    pool: list[Beam]  # the finished beams the answer comes from
    rounds: list[list[dict]]  # every candidate of every round: its beam, parent, step, score, whether it survived
    tokens: int  # step tokens drawn, over every candidate
    passes: int  # verification passes, over every candidate's row


@dataclass
class Question:
    """One question's search: the engine and what every round needs."""

    engine: Engine
    question: str  # as the scorer sees it
    ids: list[int]  # its prompt's token ids
    group: int  # the drafter group of all its rows
    params: SamplingParams  # max_new_tokens: the most tokens of a whole beam
    config: SearchConfig
    scorer: StepScorer = MEAN_LOGPROB
    on_tokens: Tokens | None = None
    rows: int = 0  # rows made so far (each row's index, hence its random stream, is its own)
    passes: int = 0  # verification passes of those rows
    last: list[int] = field(default_factory=list)  # uids of the last round's rows (the engine keeps their cache)
    beams: itertools.count = field(default_factory=lambda: itertools.count(1))

    def step_params(self, beam: Beam) -> SamplingParams:
        left = self.params.max_new_tokens - len(beam.tokens)
        return replace(self.params, max_new_tokens=min(self.config.step_tokens, left),
                       stop=[self.config.delimiter, *self.params.stop])


def draw_steps(q: Question, beams: list[Beam], children: int) -> list[list[Step]]:
    """`children` steps drawn after each beam, the rows of all of them decoded as one batch: [beam][child]."""
    rows = []
    for beam in beams:
        tokens, params = beam.tokens, q.step_params(beam)
        for _ in range(children):
            rows.append(Row(q.ids + tokens, params, group=q.group, index=q.rows, logprobs=[],
                            question_len=len(q.ids) if tokens else None,
                            continues=beam.steps[-1].row if beam.steps else None))
            q.rows += 1
    on_commit = (lambda r, new: q.on_tokens(q.group, len(new))) if q.on_tokens else None
    q.engine.run(rows, on_commit)
    q.engine.forget(q.last)  # the rows this round continued: no later round continues them
    q.last = [r.uid for r in rows]
    q.passes += sum(r.stats.steps for r in rows)
    steps = [cut_step(r, q.engine.target, q.config.delimiter) for r in rows]
    return [steps[i * children:(i + 1) * children] for i in range(len(beams))]


def cut_step(row: Row, target, delimiter: str) -> Step:
    """The step a finished row drew: its tokens up to the first end (end of sequence, or the first token after which
    the text holds a stop string), the rest dropped. Every prefix is looked at, not only where passes ended, so where
    a step ends depends on its tokens alone, however many tokens a pass brought (even where a decoder's text of a
    prefix is not the start of the next prefix's)."""
    gen, params = row.generated, row.params
    cut, end = len(gen), "step_tokens" if len(gen) >= params.max_new_tokens else "length"
    if not params.ignore_eos:
        cut, end = next(((i + 1, "eos") for i, t in enumerate(gen) if t in target.eos_ids), (cut, end))
    hit = next((t for t in range(1, cut + 1) if stop_index(target.decode(gen[:t]), params.stop) is not None), None)
    if hit is not None:
        cut, text = hit, target.decode(gen[:hit])
        end = "delimiter" if text.find(delimiter) == stop_index(text, params.stop) else "stop"
    return Step(target.decode(gen[:cut]), gen[:cut], list(row.logprobs or [])[:cut], end, row.stats.steps, row=row.uid)


def score(q: Question, parent: Beam, step: Step) -> float:
    if q.scorer is MEAN_LOGPROB:
        return MEAN_LOGPROB.of(step)
    return checked_score(q.scorer(q.question, [s.text for s in parent.steps], step.text), q.scorer)


def finish_reason(q: Question, beam: Beam) -> str | None:
    """Why a beam that just grew a step is finished (None: it goes on)."""
    step = beam.steps[-1]
    if step.end in ("eos", "stop"):
        return step.end
    if q.config.is_final(step.text):
        return "answer"
    tokens = len(beam.tokens)
    if step.end == "length" or tokens >= q.params.max_new_tokens or len(q.ids) + tokens + 1 >= q.engine.target.max_len:
        return "length"
    return None


def extend(q: Question, beams: list[Beam], children: int) -> list[Beam]:
    """Every beam's candidates (beam-major), each scored and its end decided."""
    out = []
    for beam, steps in zip(beams, draw_steps(q, beams, children)):
        for step in steps:
            step.score = score(q, beam, step)
            child = beam.child(next(q.beams), step)
            child.finished = finish_reason(q, child)
            out.append(child)
    return out


def best(candidates: list[Beam], k: int) -> list[Beam]:
    """The k highest-scored candidates (ties: the earlier drawn)."""
    return sorted(candidates, key=lambda b: (-b.steps[-1].score, b.id))[:max(k, 0)]


def record(candidates: list[Beam], kept: list[Beam]) -> list[dict]:
    ids = {b.id for b in kept}
    return [{"beam": b.id, "parent": b.parent, "subtree": b.subtree, "step": b.steps[-1].text,
             "tokens": len(b.steps[-1].tokens), "score": b.steps[-1].score, "end": b.steps[-1].end,
             "finished": b.finished, "kept": b.id in ids} for b in candidates]


def beam_search(q: Question, n: int, on_round: Callable[[int], None]) -> tuple[list[Beam], list[list[dict]]]:
    """Round 1: n steps from the question; then N/W per live beam; the best W - finished survive."""
    width, live, done, rounds = q.config.width, [Beam(0, None, 0)], [], []
    for r in range(q.config.rounds):
        on_round(r)
        candidates = extend(q, live, n if r == 0 else n // width)
        kept = best(candidates, width - len(done))
        done += [b for b in kept if b.finished]
        live = [b for b in kept if not b.finished]
        rounds.append(record(candidates, kept))
        if not live:
            break
    stopped(live)
    return done + live, rounds


def dvts(q: Question, n: int, on_round: Callable[[int], None]) -> tuple[list[Beam], list[list[dict]]]:
    """N/W subtrees; each round every unfinished subtree's best partial solution grows W steps and the best stays."""
    width = q.config.width
    heads, rounds = [Beam(-1 - i, None, i) for i in range(n // width)], []
    for r in range(q.config.rounds):
        live = [h for h in heads if not h.finished]
        if not live:
            break
        on_round(r)
        candidates = extend(q, live, width)
        kept = [best(candidates[i * width:(i + 1) * width], 1)[0] for i in range(len(live))]
        for b in kept:
            heads[b.subtree] = b
        rounds.append(record(candidates, kept))
    stopped([h for h in heads if not h.finished])
    return [h for h in heads if h.steps], rounds


def stopped(beams: list[Beam]) -> None:
    """Beams still live after the last round are finished as they are."""
    for b in beams:
        b.finished = "rounds"


def search(q: Question, n: int, strategy: str, on_round: Rounds | None = None) -> SearchResult:
    """One question's tree search (strategy "beam" or "dvts") with n candidates a round; its group is held in the
    engine's drafter from the first round to the last and released at the end."""
    grow = {"beam": beam_search, "dvts": dvts}[strategy]
    q.engine.hold(q.group)
    try:
        pool, rounds = grow(q, n, (lambda r: on_round(q.group, r)) if on_round else (lambda r: None))
    finally:
        q.engine.release(q.group)
    tokens = sum(c["tokens"] for rnd in rounds for c in rnd)
    return SearchResult(pool, rounds, tokens, q.passes)
