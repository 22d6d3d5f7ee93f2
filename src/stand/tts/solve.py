"""Test-time scaling: N samples per question, then self-consistency (majority vote) or best-of-N; or a tree search
over reasoning steps (beam search, DVTS: tts/search.py).

`solve` runs the N samples of each question as one drafter group, batched (together, as rows of one
batch), sequential (one after another: later samples draft from what earlier ones taught the
drafter), or `auto` (k at a time, the k that this machine's cost grid and the drafter's acceptance
curve say is fastest: Sizer.best_live). A search runs its rounds one after another, the N candidates of a
round batched, every round's rows in the question's one drafter group.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator

from stand.api import AUTO, Target, check_schedule, encode_prompts, make_engine, resolve_target, run_group, to_sample
from stand.core.sequence import Row, mean_accepted
from stand.engine import Engine
from stand.errors import StandError
from stand.params import SamplingParams, SpecConfig
from stand.tts.answers import Extractor, answer_key, extract_answer, is_correct
from stand.tts.problems import Problem
from stand.tts.scorers import MEAN_LOGPROB, StepScorer, resolve_scorer
from stand.tts.search import Beam, Question, Rounds, SearchConfig, SearchResult, search
from stand.tts.search import STRATEGIES as SEARCHES
from stand.tts.vote import ScoredSample, Scorer, best_of_n, majority_vote, mean_logprob, score_weights

STRATEGIES = ("self-consistency", "best-of-n") + SEARCHES
SOLVE_PARAMS = SamplingParams(temperature=0.6, max_new_tokens=512, seed=0)  # solve's default sampling
Progress = Callable[[int, int], None]  # (question index, tokens just committed)


@dataclass
class SolveConfig:
    """How the N samples of a question are drawn and turned into one answer."""

    n: int = 8
    strategy: str = "self-consistency"
    schedule: str = AUTO  # batched | sequential | auto (k at a time, from the cost grid); a search batches its rounds
    # best-of-n: (question, sample) -> score; beam/dvts: (question, steps_so_far, step) -> score or a reward model
    # directory (None: mean token log-probability of the sample, or of the step); higher is better
    scorer: Scorer | StepScorer | str | None = None
    extractor: Extractor = extract_answer  # text -> answer or None
    normalizer: Callable[[str], str] = answer_key  # answers with equal keys vote together
    chat: bool = True  # prompts through the model's chat template
    search: SearchConfig = field(default_factory=SearchConfig)  # beam / dvts: width, steps, rounds, answer_by

    @property
    def searches(self) -> bool:
        return self.strategy in SEARCHES

    def validate(self) -> "SolveConfig":
        if not isinstance(self.n, int) or self.n < 1:
            raise StandError(f"n must be an integer >= 1, got {self.n}")
        if self.strategy not in STRATEGIES:
            raise StandError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        check_schedule(self.schedule)
        if self.searches:
            self.search.validate(self.n)
        for name in ("extractor", "normalizer"):
            if not callable(getattr(self, name)):
                raise StandError(f"{name} must be a callable")
        search_only = self.scorer is MEAN_LOGPROB or isinstance(self.scorer, str)
        if not (self.scorer is None or callable(self.scorer) or (self.searches and search_only)):
            raise StandError("scorer must be a callable" + (" or a reward model directory" if self.searches else ""))
        return self

    def with_scorer(self) -> "SolveConfig":
        """Checked, with its scorer resolved (the default for the strategy; a reward model directory loaded)."""
        self.validate()
        if self.searches:
            return replace(self, scorer=resolve_scorer(self.scorer))
        return replace(self, scorer=self.scorer or mean_logprob)


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
    new_tokens: int  # tokens generated (a search: the steps of every candidate)
    passes: int = 0  # verification passes behind new_tokens, summed over rows
    n: int = 0  # samples (a search: candidates a round)
    rounds: list | None = None  # a search: every round's candidates (tts/search.py record)

    @property
    def tok_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        return mean_accepted(self.new_tokens, self.passes)

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
          strategy: str = "self-consistency", schedule: str = AUTO, scorer: Scorer | StepScorer | str | None = None,
          extractor: Extractor | None = None, normalizer: Callable[[str], str] | None = None, chat: bool = True,
          search: SearchConfig | None = None, backend: str = "auto", dtype: str = "auto",
          device: str = "auto") -> list[Solution]:
    """N samples per question, then the answer by majority vote or by the best score; or a tree search.

    questions: strings (used as the prompt as given) or `Problem`s (their `answer` is the reference).
    model: a path (None: the embedded default), loaded with `backend`, `dtype` and `device`, or a loaded Backend.
    extractor(text) -> answer or None (default: math answers, `extract_answer`); normalizer(answer) -> key,
    answers with equal keys vote together (default: `answer_key`, math-aware).
    scorer(question, sample) -> float, higher is better (default: mean token log-probability).
    strategy "beam" or "dvts": a tree search over reasoning steps with n candidates a round (tts/search.py), shaped
    by `search` (SearchConfig: width, step delimiter, step tokens, rounds, answer_by); its scorer is
    scorer(question, steps_so_far, step) -> float or a reward model directory (default: the step's mean token
    log-probability); params.max_new_tokens bounds a whole beam.
    schedule: "batched", "sequential" or "auto" (k samples at a time, the k this machine's cost grid and the
    drafter's acceptance curve say is fastest; Solution.schedule says what ran).
    The samples are what plain decoding of the model gives (same tokens at T=0, same distribution
    when sampling); spec.method only changes the speed. Every sample carries its stats (mean_accepted
    per sample index shows later samples drafting better under the sequential schedule).
    """
    config = SolveConfig(n, strategy, schedule, scorer, extractor or extract_answer, normalizer or answer_key, chat,
                         search or SearchConfig())
    return list(iter_solve(questions, model, params=params, spec=spec, config=config, backend=backend, dtype=dtype,
                           device=device))


def iter_solve(questions: str | Problem | list[str | Problem], model: Target | str | None = None, *,
               params: SamplingParams = SOLVE_PARAMS, spec: SpecConfig = SpecConfig(),
               config: SolveConfig = SolveConfig(), backend: str = "auto", dtype: str = "auto", device: str = "auto",
               progress: Progress | None = None, on_round: Rounds | None = None) -> Iterator[Solution]:
    """`solve`, one Solution at a time as each question finishes; progress(question, tokens) as tokens commit,
    on_round(question, round) as a search's round starts."""
    problems = as_problems(questions)
    params, spec = params.validate(), spec.validate()
    config = config.with_scorer()
    target = resolve_target(model, backend, dtype, device, spec.method)
    prompt_ids = encode_prompts(target, [p.prompt for p in problems], config.chat)
    engine = make_engine(target, spec)
    for i, (problem, ids) in enumerate(zip(problems, prompt_ids)):
        if config.searches:
            yield search_one(engine, problem, ids, i, params, config, progress, on_round)
        else:
            yield solve_one(engine, problem, ids, i, params, config, progress)


def solve_one(engine: Engine, problem: Problem, prompt_ids: list[int], group: int, params: SamplingParams,
              config: SolveConfig, progress: Progress | None = None) -> Solution:
    rows = [Row(prompt_ids, params, group=group, index=j, logprobs=[]) for j in range(config.n)]
    on_commit = (lambda r, new: progress(group, len(new))) if progress else None
    t = time.perf_counter()
    schedule = run_group(engine, rows, config.schedule, on_commit)
    seconds = time.perf_counter() - t
    samples = [score_sample(problem.prompt, r, config) for r in rows]
    return decide(problem, samples, config, schedule, seconds, sum(r.stats.steps for r in rows))


def search_one(engine: Engine, problem: Problem, prompt_ids: list[int], group: int, params: SamplingParams,
               config: SolveConfig, progress: Progress | None = None, on_round: Rounds | None = None) -> Solution:
    """A tree search for one question; the answer from its finished beams."""
    q = Question(engine, problem.prompt, prompt_ids, group, params, config.search, config.scorer, progress)
    t = time.perf_counter()
    result = search(q, config.n, config.strategy, on_round)
    seconds = time.perf_counter() - t
    samples = [beam_sample(b, j, group, engine.target.decode, config) for j, b in enumerate(result.pool)]
    return decide(problem, samples, config, f"width {config.search.width}", seconds, result.passes, result)


def beam_sample(beam: Beam, index: int, group: int, decode: Callable[[list[int]], str],
                config: SolveConfig) -> ScoredSample:
    """A finished beam as a sample: its whole text, its answer, its score (the mean of its steps')."""
    tokens = beam.tokens
    text = decode(tokens)
    answer = config.extractor(text)
    passes = sum(s.passes for s in beam.steps)
    stats = {"new_tokens": len(tokens), "forward_passes": passes + len(beam.steps), "steps": passes,
             "mean_accepted": mean_accepted(len(tokens), passes), "beam": beam.id, "subtree": beam.subtree,
             "reasoning_steps": [{"text": s.text, "score": s.score, "end": s.end} for s in beam.steps]}
    return ScoredSample(text, tokens, beam.finished or "", stats, group, index, answer=answer,
                        key=None if answer is None else config.normalizer(answer), score=beam.score,
                        logprobs=[x for s in beam.steps for x in s.logprobs])


def score_sample(question: str, row: Row, config: SolveConfig) -> ScoredSample:
    base = to_sample(row)
    answer = config.extractor(base.text)
    s = ScoredSample(**base.__dict__, answer=answer, key=None if answer is None else config.normalizer(answer),
                     logprobs=list(row.logprobs or []))
    s.score = float(config.scorer(question, s))
    return s


def decide(problem: Problem, samples: list[ScoredSample], config: SolveConfig, schedule: str, seconds: float,
           passes: int | None = None, searched: SearchResult | None = None) -> Solution:
    """The answer: best-of-n (or a search's answer_by "best") takes the best-scored sample's; otherwise the vote,
    weighted by score (exp(score - best)) in a search. passes: verification passes behind the tokens (None: the
    samples')."""
    if passes is None:
        passes = sum(s.stats["steps"] for s in samples)
    scores = [s.score for s in samples]
    weights = score_weights(scores) if searched is not None else None
    vote = majority_vote([s.answer for s in samples], config.normalizer, weights)
    if samples and (config.strategy == "best-of-n" or (searched is not None and config.search.answer_by == "best")):
        chosen = best_of_n(scores)
        answer = samples[chosen].answer
        share = vote.counts.get(samples[chosen].key, 0) / sum(weights or [1] * len(samples)) if answer is not None else 0.0
    else:
        chosen, answer, share = vote.first, vote.answer, vote.share
    tokens = searched.tokens if searched is not None else sum(s.stats["new_tokens"] for s in samples)
    return Solution(problem.id, problem.prompt, answer, is_correct(answer, problem.answer), problem.answer,
                    config.strategy, chosen, share, vote.counts, samples, schedule, seconds, tokens, passes, config.n,
                    searched.rounds if searched is not None else None)


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
    """correct / judged, where judged excludes questions without a reference (see `tally`)."""
    return tally([(s.reference is not None, s.correct, s.answer) for s in solutions])


def tally(outcomes: list[tuple[bool, bool, str | None]]) -> dict:
    """correct / judged over (judged, correct, answer) outcomes; no-answer counts as judged wrong for accuracy but is
    reported apart. The one accuracy rule: `solve` and the search bench's merged files both count with it."""
    judged = [(right, answer) for is_judged, right, answer in outcomes if is_judged]
    right = sum(1 for ok, _ in judged if ok)
    return {"judged": len(judged), "correct": right, "no_answer": sum(1 for _, a in judged if a is None),
            "accuracy": right / len(judged) if judged else None}
