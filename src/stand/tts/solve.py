"""Test-time scaling: N samples per question, then self-consistency (majority vote) or best-of-N.

`solve` runs the N samples of each question as one drafter group, batched (together, as rows of one
batch), sequential (one after another: later samples draft from what earlier ones taught the
drafter), or `auto` (k at a time, the k that this machine's cost grid and the drafter's acceptance
curve say is fastest: Sizer.best_live).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from stand.api import AUTO, Target, check_schedule, encode_prompts, make_engine, resolve_target, run_group, to_sample
from stand.core.sequence import Row, mean_accepted
from stand.engine import Engine
from stand.errors import StandError
from stand.params import SamplingParams, SpecConfig
from stand.tts.answers import Extractor, answer_key, extract_answer, is_correct
from stand.tts.problems import Problem
from stand.tts.vote import ScoredSample, Scorer, best_of_n, majority_vote, mean_logprob

STRATEGIES = ("self-consistency", "best-of-n")
SOLVE_PARAMS = SamplingParams(temperature=0.6, max_new_tokens=512, seed=0)  # solve's default sampling
Progress = Callable[[int, int], None]  # (question index, tokens just committed)


@dataclass
class SolveConfig:
    """How the N samples of a question are drawn and turned into one answer."""

    n: int = 8
    strategy: str = "self-consistency"
    schedule: str = AUTO  # batched | sequential | auto (k at a time, from the cost grid)
    scorer: Scorer = mean_logprob  # best-of-n: (question, sample) -> score, higher is better
    extractor: Extractor = extract_answer  # text -> answer or None
    normalizer: Callable[[str], str] = answer_key  # answers with equal keys vote together
    chat: bool = True  # prompts through the model's chat template

    def validate(self) -> "SolveConfig":
        if not isinstance(self.n, int) or self.n < 1:
            raise StandError(f"n must be an integer >= 1, got {self.n}")
        if self.strategy not in STRATEGIES:
            raise StandError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        check_schedule(self.schedule)
        for name in ("extractor", "scorer", "normalizer"):
            if not callable(getattr(self, name)):
                raise StandError(f"{name} must be a callable")
        return self


@dataclass
class Solution:
    id: str
    question: str  # the prompt, instruction included
    answer: str | None  # the voted answer (self-consistency) or the best sample's (best-of-n); None: no answer
    correct: bool | None  # None: no reference, or no answer found
    reference: str | None
    strategy: str
    chosen: int | None  # the sample the answer comes from
    vote_share: float  # votes for the answer / n
    votes: dict[str, int]  # normalised answer -> votes
    samples: list[ScoredSample]
    schedule: str
    seconds: float  # wall time to produce all n samples
    new_tokens: int

    @property
    def tok_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        return mean_accepted(self.new_tokens, sum(s.stats["steps"] for s in self.samples))

    def as_dict(self) -> dict:
        return asdict(self) | {"tok_per_s": self.tok_per_s}


def as_problems(questions: str | Problem | list[str | Problem]) -> list[Problem]:
    """Questions as Problems; a plain string is used as the prompt exactly as given."""
    if isinstance(questions, (str, Problem)):
        questions = [questions]
    if not questions:
        raise StandError("no questions given")
    out = []
    for i, q in enumerate(questions):
        if isinstance(q, str):
            q = Problem(f"q{i}", q)
        if not isinstance(q, Problem) or not q.prompt.strip():
            raise StandError(f"question {i} is empty or not a string / Problem")
        out.append(q)
    return out


def solve(questions: str | Problem | list[str | Problem], model: Target | str | None = None, *,
          params: SamplingParams = SOLVE_PARAMS, spec: SpecConfig = SpecConfig(), n: int = 8,
          strategy: str = "self-consistency", schedule: str = AUTO, scorer: Scorer | None = None,
          extractor: Extractor | None = None, normalizer: Callable[[str], str] | None = None, chat: bool = True,
          backend: str = "auto", dtype: str = "auto") -> list[Solution]:
    """N samples per question, then the answer by majority vote or by the best score.

    questions: strings (used as the prompt as given) or `Problem`s (their `answer` is the reference).
    model: a path (None: the embedded default), loaded with `backend` and `dtype`, or a loaded Backend.
    extractor(text) -> answer or None (default: math answers, `extract_answer`); normalizer(answer) -> key,
    answers with equal keys vote together (default: `answer_key`, math-aware).
    scorer(question, sample) -> float, higher is better (default: mean token log-probability).
    schedule: "batched", "sequential" or "auto" (k samples at a time, the k this machine's cost grid and the
    drafter's acceptance curve say is fastest; Solution.schedule says what ran).
    The samples are what plain decoding of the model gives (same tokens at T=0, same distribution
    when sampling); spec.method only changes the speed. Every sample carries its stats (mean_accepted
    per sample index shows later samples drafting better under the sequential schedule).
    """
    config = SolveConfig(n, strategy, schedule, scorer or mean_logprob, extractor or extract_answer,
                         normalizer or answer_key, chat)
    return list(iter_solve(questions, model, params=params, spec=spec, config=config, backend=backend, dtype=dtype))


def iter_solve(questions: str | Problem | list[str | Problem], model: Target | str | None = None, *,
               params: SamplingParams = SOLVE_PARAMS, spec: SpecConfig = SpecConfig(),
               config: SolveConfig = SolveConfig(), backend: str = "auto", dtype: str = "auto",
               progress: Progress | None = None) -> Iterator[Solution]:
    """`solve`, one Solution at a time as each question finishes; progress(question, tokens) as tokens commit."""
    problems = as_problems(questions)
    config, params, spec = config.validate(), params.validate(), spec.validate()
    target = resolve_target(model, backend, dtype)
    prompt_ids = encode_prompts(target, [p.prompt for p in problems], config.chat)
    engine = make_engine(target, spec)
    for i, (problem, ids) in enumerate(zip(problems, prompt_ids)):
        yield solve_one(engine, problem, ids, i, params, config, progress)


def solve_one(engine: Engine, problem: Problem, prompt_ids: list[int], group: int, params: SamplingParams,
              config: SolveConfig, progress: Progress | None = None) -> Solution:
    rows = [Row(prompt_ids, params, group=group, index=j, logprobs=[]) for j in range(config.n)]
    on_commit = (lambda r, new: progress(group, len(new))) if progress else None
    t = time.perf_counter()
    schedule = run_group(engine, rows, config.schedule, on_commit)
    seconds = time.perf_counter() - t
    samples = [score_sample(problem.prompt, r, config) for r in rows]
    return decide(problem, samples, config, schedule, seconds)


def score_sample(question: str, row: Row, config: SolveConfig) -> ScoredSample:
    base = to_sample(row)
    answer = config.extractor(base.text)
    s = ScoredSample(**base.__dict__, answer=answer, key=None if answer is None else config.normalizer(answer),
                     logprobs=list(row.logprobs or []))
    s.score = float(config.scorer(question, s))
    return s


def decide(problem: Problem, samples: list[ScoredSample], config: SolveConfig, schedule: str,
           seconds: float) -> Solution:
    vote = majority_vote([s.answer for s in samples], config.normalizer)
    if config.strategy == "best-of-n":
        chosen = best_of_n([s.score for s in samples])
        answer = samples[chosen].answer
        share = vote.counts.get(samples[chosen].key, 0) / len(samples) if answer is not None else 0.0
    else:
        chosen, answer, share = vote.first, vote.answer, vote.share
    return Solution(problem.id, problem.prompt, answer, is_correct(answer, problem.answer), problem.answer,
                    config.strategy, chosen, share, vote.counts, samples, schedule, seconds,
                    sum(s.stats["new_tokens"] for s in samples))


def acceptance_by_index(solutions: list[Solution]) -> list[float]:
    """Tokens per verification step for sample index j, pooled over questions (1.0 = no draft accepted)."""
    n = max((len(s.samples) for s in solutions), default=0)
    toks, steps = [0] * n, [0] * n
    for sol in solutions:
        for smp in sol.samples:
            toks[smp.index] += smp.stats["new_tokens"]
            steps[smp.index] += smp.stats["steps"]
    return [mean_accepted(t, st) for t, st in zip(toks, steps)]


def accuracy(solutions: list[Solution]) -> dict:
    """correct / judged, where judged excludes questions without a reference; no-answer counts as judged wrong
    for accuracy but is reported apart."""
    judged = [s for s in solutions if s.reference is not None]
    right = sum(1 for s in judged if s.correct)
    return {"judged": len(judged), "correct": right, "no_answer": sum(1 for s in judged if s.answer is None),
            "accuracy": right / len(judged) if judged else None}
