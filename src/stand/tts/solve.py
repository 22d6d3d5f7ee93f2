"""Test-time scaling: N samples per question, then self-consistency (majority vote) or best-of-N.

`solve` runs the N samples of each question as one drafter group, batched (together, as rows of one
batch) or sequential (one after another: later samples draft from what earlier ones taught the
drafter), or `auto` (a short timed probe of both on this model and machine, cached on disk).

Final answers of math solutions: extraction from a sample's text, normalisation, reference matching.

Extraction (first rule that finds something wins): the last `\\boxed{...}` (nested braces), the last
"the answer is ..." / "final answer: ...", the last number. Nothing found gives None, which callers
report as "no answer", never as a wrong one.

Normalisation turns an answer into a key: LaTeX is flattened (`\\frac{1}{2}`, `\\dfrac12` -> 1/2,
`\\sqrt{3}` -> sqrt(3), `\\text{No}` -> No), spaces and case dropped. A number or a numeric expression
(+ - * / ^, sqrt, pi) becomes its value: exact rationals as a reduced fraction (so 1/2, 0.5, 2/4 and
\\frac{1}{2} share the key "n:1/2"), irrational values rounded to 10 significant digits. Lists ("376
and 625", "1, 4, 9") become sorted sets. Symbolic expressions are compared as normalised text only.
"""

from __future__ import annotations

import ast
import json
import math
import os
import platform
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Callable, Iterator

import torch

from stand.api import Sample, encode_prompts, make_engine, resolve_target, run_group, to_sample
from stand.tts.problems import Problem
from stand.core.sequence import Row
from stand.engine import Engine
from stand.core import files
from stand.errors import StandError
from stand.backends.protocol import Backend as Target
from stand.params import SamplingParams, SpecConfig

Extractor = Callable[[str], "str | None"]

NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?"
_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)


# ---- extraction ---------------------------------------------------------------------------------

def boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (braces balanced), or of `\\boxed 5`."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            inner = _balanced(text, i)
            if inner is not None:
                return inner.strip()
        elif i < len(text):
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                return tok.group(0)
    return None


def _balanced(text: str, i: int) -> str | None:
    """text[i] == '{': the content up to its matching '}', or None if unclosed."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    return None


def answer_is(text: str) -> str | None:
    """What follows the last "the answer is" / "final answer:", up to the end of its line or sentence."""
    hits = list(_ANSWER_IS.finditer(text))
    if not hits:
        return None
    tail = hits[-1].group(1).strip()
    tail = re.split(r"\.(?:\s|$)|\n", tail)[0]  # a sentence ends at a period before a space (0.5 stays)
    tail = tail.strip().strip("*$ ").rstrip(".").strip()
    if tail.count("{") != tail.count("}"):  # cut off mid-expression, e.g. a truncated "\\boxed{"
        return None
    return tail or None


def last_number(text: str) -> str | None:
    nums = re.findall(NUMBER, text)
    return nums[-1].replace(" ", "") if nums else None


def extract_answer(text: str) -> str | None:
    """The final answer of a math solution, or None when none is found."""
    for rule in (boxed, answer_is, last_number):
        found = rule(text)
        if found:
            return found
    return None


# ---- normalisation ------------------------------------------------------------------------------

_LATEX_DROP = [r"\$", r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\ ", "$", r"\(", r"\)",
               r"\[", r"\]", r"\%", "%"]
_LATEX_SUB = [(r"\cdot", "*"), (r"\times", "*"), (r"\div", "/"), (r"\pm", "±"), (r"\mp", "∓"), (r"\leq", "<="),
              (r"\le", "<="), (r"\geq", ">="), (r"\ge", ">="), ("≤", "<="), ("≥", ">="), (r"\neq", "!="),
              (r"\infty", "inf"), (r"\pi", "pi"), ("−", "-"), ("·", "*"), ("×", "*")]


def latex_to_plain(s: str) -> str:
    """Flattens the LaTeX a model puts in an answer into plain math text."""
    s = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    for _ in range(4):  # nested fractions and roots, innermost first
        s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", lambda m: _frac(m[1], m[2]), s)
        s = re.sub(r"\\frac\s*(\w)\s*(\w)", r"\1/\2", s)  # \frac12
        s = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", s)
        s = re.sub(r"\\sqrt\s*(\w)", r"sqrt(\1)", s)
    for a, b in _LATEX_SUB:
        s = s.replace(a, b)
    for a in _LATEX_DROP:
        s = s.replace(a, "")
    s = s.replace("{", "(").replace("}", ")")
    return s.strip().rstrip(".").strip()


def _frac(num: str, den: str) -> str:
    """a/b with the brackets precedence needs: numerators with + or -, denominators that are not atoms."""
    num, den = num.strip(), den.strip()
    num = f"({num})" if _top_level(num.lstrip("-"), "+-") else num
    den = den if re.fullmatch(r"\d+(\.\d+)?|[a-zA-Z]", den) else f"({den})"
    return f"{num}/{den}"


def _top_level(s: str, chars: str) -> bool:
    """Whether s has one of chars outside brackets."""
    depth = 0
    for c in s:
        depth += 1 if c in "([{" else -1 if c in ")]}" else 0
        if depth == 0 and c in chars:
            return True
    return False


def split_top(s: str) -> list[str]:
    """Splits a list answer at top-level commas, semicolons and the word "and" (not inside brackets)."""
    parts, depth, cur, i = [], 0, "", 0
    while i < len(s):
        c = s[i]
        depth += 1 if c in "([" else -1 if c in ")]" else 0
        if depth == 0 and (c in ",;" or s.startswith(" and ", i)):
            parts.append(cur)
            cur, i = "", i + (5 if c == " " else 1)
            continue
        cur += c
        i += 1
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def answer_key(answer: str) -> str:
    """The key two answers share when they are the same answer (see the module docstring)."""
    s = latex_to_plain(answer)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 2,001,000 (but "625, 376" is a list)
        s = s.replace(",", "")
    parts = split_top(s)
    if len(parts) > 1:
        return "{" + ",".join(sorted({_atom_key(p) for p in parts})) + "}"
    single = re.fullmatch(r"\s*[a-zA-Z]\s*=\s*([^=]+)", s)  # "x = 5" -> "5"
    return _atom_key(single[1] if single else s)


def _atom_key(s: str) -> str:
    s = re.sub(r"\s+", "", s).lower().rstrip(".")
    value = numeric_value(s)
    if value is not None:
        return "n:" + (str(value) if isinstance(value, Fraction) else f"{value:.10g}")
    return re.sub(r"(?<![a-z])\((\d+|[a-z])\)", r"\1", s)  # "2^(n)" -> "2^n"; f(x), (2n)! untouched


def numeric_value(s: str) -> Fraction | float | None:
    """The value of a number or numeric expression (+ - * / ^, sqrt, pi), exact where rational."""
    if not re.fullmatch(r"[\d.+\-*/^()]*", re.sub(r"sqrt|pi", "", s)) or not re.search(r"\d", s):
        return None
    expr = s.replace("^", "**")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # "2(3)" compiles with a warning
            tree = ast.parse(expr, mode="eval")
        return _eval(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None


def _eval(node: ast.AST) -> Fraction | float:
    """A tiny evaluator over a whitelist of nodes: no names but sqrt and pi, bounded exponents."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _eval(node.left), _eval(node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt" and len(node.args) == 1:
        return _sqrt(_eval(node.args[0]))
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    raise ValueError("not a numeric expression")


def _binop(op: ast.operator, a, b):
    if isinstance(op, ast.Add):
        return a + b
    if isinstance(op, ast.Sub):
        return a - b
    if isinstance(op, ast.Mult):
        return a * b
    if isinstance(op, ast.Div):
        return a / b
    if isinstance(op, ast.Pow):
        if abs(b) > 4096:
            raise ValueError("exponent too large")
        if isinstance(b, Fraction) and b.denominator == 1 and isinstance(a, Fraction):
            return a ** int(b)
        return float(a) ** float(b)
    raise ValueError("operator not allowed")


def _sqrt(v):
    if v < 0:
        raise ValueError("sqrt of a negative number")
    if isinstance(v, Fraction):
        n, d = math.isqrt(v.numerator), math.isqrt(v.denominator)
        if n * n == v.numerator and d * d == v.denominator:
            return Fraction(n, d)
    return math.sqrt(v)


# ---- reference answers (CHAMP style) -------------------------------------------------------------

_ONLY_VALUE = [r"^(.+?) is the only possible value$", r"^the limit exists and is equal to (.+)$",
               r"^the only possible value for the limit is (.+)$", r"^the only possible value is (.+)$"]


def reference_forms(reference: str) -> list[str]:
    """The accepted forms of a reference answer written in words, as CHAMP writes them.

    "C(10, 5), or equivalently 252" -> both forms; ", or approximately ..." is dropped (not exact);
    "100 (i.e., all values)" -> also "100"; "0 is the only possible value" / "The limit exists and is
    equal to 3" -> also the value; "98 values", "0 roots" -> also the number; "No integer solutions",
    "Yes, and ..." -> also "no" / "yes".
    """
    text = re.split(r",\s*or approximately", reference)[0]
    forms = [f.strip() for f in re.split(r",\s*or (?:equivalently|an equivalent form such as)\s*", text)]
    out = []
    for f in forms:
        out.append(f)
        bare = re.sub(r"\s*\((?:i\.e\.,?|no|none)[^()]*\)\s*$", "", f).strip()
        out.append(bare)
        for pat in _ONLY_VALUE:
            m = re.match(pat, bare, re.IGNORECASE)
            if m:
                out.append(m[1])
        m = re.fullmatch(r"(-?\d+)\s+[a-zA-Z ]+", bare)
        if m:
            out.append(m[1])
        first = re.match(r"(yes|no)\b", bare, re.IGNORECASE)
        if first:
            out.append(first[1])
    return list(dict.fromkeys(out))


def is_correct(answer: str | None, reference: str | None) -> bool | None:
    """True/False; None when there is no answer to judge or no reference to judge it by."""
    if answer is None or reference is None:
        return None
    return answer_key(answer) in {answer_key(f) for f in reference_forms(reference)}


# ---- voting and scoring -------------------------------------------------------------------------

@dataclass
class Vote:
    answer: str | None  # the winning answer, as the first sample that gave it wrote it; None: no sample answered
    key: str | None  # its normalised key
    votes: int
    share: float  # votes / number of samples (samples without an answer count in the denominator)
    counts: dict[str, int]  # key -> votes
    first: int | None  # index of the first sample that gave the winning answer


def majority_vote(answers: list[str | None], key: Callable[[str], str] | None = None) -> Vote:
    """The most frequent answer key (key: the normaliser, default answer_key). Samples without an answer do not vote.

    Tie-break (deterministic): among the keys with the most votes, the one given first, i.e. by the
    sample with the lowest index.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    raw: dict[str, str] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        k = (key or answer_key)(a)
        counts[k] = counts.get(k, 0) + 1
        first.setdefault(k, i)
        raw.setdefault(k, a)
    if not counts:
        return Vote(None, None, 0, 0.0, {}, None)
    best = min(counts, key=lambda k: (-counts[k], first[k]))
    return Vote(raw[best], best, counts[best], counts[best] / max(len(answers), 1), counts, first[best])


@dataclass
class ScoredSample(Sample):
    answer: str | None = None  # extracted final answer; None: none found
    key: str | None = None  # normalised answer
    score: float | None = None  # best-of-N score (higher is better)
    logprobs: list[float] = field(default_factory=list)  # per generated token, under the model at T=1


Scorer = Callable[[str, ScoredSample], float]  # (question, sample) -> score, higher is better


def mean_logprob(question: str, sample: ScoredSample) -> float:
    """The default best-of-N score: mean log-probability of the sample's tokens under the model (T=1)."""
    return sum(sample.logprobs) / len(sample.logprobs) if sample.logprobs else float("-inf")


@torch.inference_mode()
def sequence_logprobs(target: Target, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    """Log-probability (T=1) of each of token_ids after prompt_ids, from one forward pass."""
    ids = torch.tensor([prompt_ids + token_ids])  # [1, P+G]
    logits = target.model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1].float()  # [G, V]
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(-1, torch.tensor(token_ids)[:, None])[:, 0].tolist()


def best_of_n(scores: list[float]) -> int:
    """Index of the highest score; ties go to the lowest index."""
    return min(range(len(scores)), key=lambda i: (-scores[i], i))


# ---- the schedule ---------------------------------------------------------------------------------

SCHEDULE_CHOICES = ("batched", "sequential", "auto")
PROBE_TOKENS = 48


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def schedule_key(target: Target, method: str, n: int, params: SamplingParams) -> str:
    """What the faster schedule depends on: model, dtype, method, N, greedy or not, threads, CPU, torch."""
    return json.dumps({"model": target.name, "dtype": str(target.dtype), "method": method, "n": n,
                       "sampled": not params.greedy, "threads": torch.get_num_threads(), "cpu": _cpu_name(),
                       "torch": torch.__version__}, sort_keys=True)


def _load_choices(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def probe(target: Target, spec: SpecConfig, n: int, params: SamplingParams, prompt_ids: list[int],
          schedule: str, tokens: int = PROBE_TOKENS) -> float:
    """Tokens per second of n samples of `tokens` tokens each under one schedule (a fresh drafter)."""
    p = SamplingParams(params.temperature, params.top_p, params.top_k, tokens, params.seed, ignore_eos=True)
    engine = make_engine(target, spec)
    rows = [Row(prompt_ids, p, group=0, index=j) for j in range(n)]
    t = time.perf_counter()
    run_group(engine, rows, schedule)
    return sum(r.stats.new_tokens for r in rows) / (time.perf_counter() - t)


def choose_schedule(target: Target, spec: SpecConfig, n: int, params: SamplingParams, prompt_ids: list[int],
                    tokens: int = PROBE_TOKENS) -> str:
    """The faster of batched and sequential here, measured once and cached in cache_dir()/schedule.json."""
    if n == 1:
        return "batched"  # one sample: the two are the same
    path = os.path.join(files.cache_dir(), "schedule.json")
    key = schedule_key(target, spec.method, n, params)
    known = _load_choices(path)
    if key in known and known[key].get("schedule") in ("batched", "sequential"):
        return known[key]["schedule"]
    probe(target, spec, 1, params, prompt_ids, "batched", 4)  # warm-up
    speed = {s: probe(target, spec, n, params, prompt_ids, s, tokens) for s in ("batched", "sequential")}
    choice = max(speed, key=speed.get)
    known[key] = {"schedule": choice, "tok_per_s": speed, "probe_tokens": tokens, "measured": time.time()}
    files.write_json(path, known)
    return choice


# ---- solve ----------------------------------------------------------------------------------------

STRATEGIES = ("self-consistency", "best-of-n")


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

    def as_dict(self) -> dict:
        return asdict(self) | {"tok_per_s": self.tok_per_s}


@dataclass
class SolveConfig:
    n: int = 8
    strategy: str = "self-consistency"
    schedule: str = "batched"
    extractor: Extractor = extract_answer
    scorer: Scorer = mean_logprob
    normalizer: Callable[[str], str] = answer_key  # answers with equal keys vote together

    def validate(self) -> "SolveConfig":
        if not isinstance(self.n, int) or self.n < 1:
            raise StandError(f"n must be an integer >= 1, got {self.n}")
        if self.strategy not in STRATEGIES:
            raise StandError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.schedule not in SCHEDULE_CHOICES:
            raise StandError(f"schedule must be one of {', '.join(SCHEDULE_CHOICES)}, got {self.schedule!r}")
        for name in ("extractor", "scorer", "normalizer"):
            if not callable(getattr(self, name)):
                raise StandError(f"{name} must be a callable")
        return self


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


def solve(questions: str | Problem | list[str | Problem], model: Target | str | None = None, n: int = 8,
          strategy: str = "self-consistency", method: str = "none", scorer: Scorer | None = None,
          extractor: Extractor | None = None, schedule: str = "batched", temperature: float = 0.6,
          top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 512, seed: int | None = 0,
          dtype: str = "auto", chat: bool = True, spec: SpecConfig | None = None,
          progress: Callable[[int, int], None] | None = None,
          normalizer: Callable[[str], str] | None = None) -> list[Solution]:
    """N samples per question, then the answer by majority vote or by the best score.

    questions: strings (used as the prompt as given) or `Problem`s (their `answer` is the reference).
    extractor(text) -> answer or None (default: math answers, `extract_answer`); normalizer(answer) -> key,
    answers with equal keys vote together (default: `answer_key`, math-aware).
    scorer(question, sample) -> float, higher is better (default: mean token log-probability).
    schedule: "batched", "sequential" or "auto" (measured once per model/method/N/machine, cached).
    progress(question_index, new_tokens): called as tokens are committed.
    The samples are what plain decoding of the model gives (same tokens at T=0, same distribution
    when sampling); `method` only changes the speed. Every sample carries its stats (mean_accepted
    per sample index shows later samples drafting better under the sequential schedule).
    """
    return list(iter_solve(questions, model, n, strategy, method, scorer, extractor, schedule, temperature,
                           top_p, top_k, max_new_tokens, seed, dtype, chat, spec, progress, normalizer))


def iter_solve(questions, model=None, n=8, strategy="self-consistency", method="none", scorer=None, extractor=None,
               schedule="batched", temperature=0.6, top_p=1.0, top_k=0, max_new_tokens=512, seed=0, dtype="auto",
               chat=True, spec=None, progress=None, normalizer=None) -> Iterator[Solution]:
    """`solve`, one Solution at a time as each question finishes (same arguments)."""
    cfg = SolveConfig(n, strategy, schedule, extractor or extract_answer, scorer or mean_logprob,
                      normalizer or answer_key).validate()
    problems = as_problems(questions)
    params = SamplingParams(temperature, top_p, top_k, max_new_tokens, seed).validate()
    spec = (spec or SpecConfig(method=method)).validate()
    target = resolve_target(model, dtype)
    prompt_ids = encode_prompts(target, [p.prompt for p in problems], chat)
    engine = make_engine(target, spec)
    if cfg.schedule == "auto":
        cfg.schedule = choose_schedule(target, spec, n, params, prompt_ids[0])
    for i, (problem, ids) in enumerate(zip(problems, prompt_ids)):
        yield solve_one(engine, problem, ids, i, params, cfg, progress)


def solve_one(engine: Engine, problem: Problem, prompt_ids: list[int], group: int, params: SamplingParams,
              cfg: SolveConfig, progress: Callable[[int, int], None] | None = None) -> Solution:
    rows = [Row(prompt_ids, params, group=group, index=j) for j in range(cfg.n)]
    for r in rows:
        r.logprobs = []
    on_commit = (lambda r, new: progress(group, len(new))) if progress else None
    t = time.perf_counter()
    run_group(engine, rows, cfg.schedule, on_commit)
    seconds = time.perf_counter() - t
    samples = [score_sample(problem.prompt, r, cfg) for r in rows]
    return decide(problem, samples, cfg, seconds)


def score_sample(question: str, row: Row, cfg: SolveConfig) -> ScoredSample:
    base = to_sample(row)
    answer = cfg.extractor(base.text)
    s = ScoredSample(**base.__dict__, answer=answer, key=None if answer is None else cfg.normalizer(answer),
                     logprobs=list(row.logprobs or []))
    s.score = float(cfg.scorer(question, s))
    return s


def decide(problem: Problem, samples: list[ScoredSample], cfg: SolveConfig, seconds: float) -> Solution:
    vote = majority_vote([s.answer for s in samples], cfg.normalizer)
    if cfg.strategy == "best-of-n":
        chosen = best_of_n([s.score for s in samples])
        answer = samples[chosen].answer
        share = vote.counts.get(samples[chosen].key, 0) / len(samples) if answer is not None else 0.0
    else:
        chosen, answer, share = vote.first, vote.answer, vote.share
    return Solution(problem.id, problem.prompt, answer, is_correct(answer, problem.answer), problem.answer,
                    cfg.strategy, chosen, share, vote.counts, samples, cfg.schedule, seconds,
                    sum(s.stats["new_tokens"] for s in samples))


def acceptance_by_index(solutions: list[Solution]) -> list[float]:
    """Tokens per verification step for sample index j, pooled over questions (1.0 = no draft accepted)."""
    n = max(len(s.samples) for s in solutions)
    toks, steps = [0] * n, [0] * n
    for sol in solutions:
        for smp in sol.samples:
            toks[smp.index] += smp.stats["new_tokens"]
            steps[smp.index] += smp.stats["steps"]
    return [t / max(st, 1) for t, st in zip(toks, steps)]


def accuracy(solutions: list[Solution]) -> dict:
    """correct / judged, where judged excludes questions without a reference; no-answer counts as judged wrong
    for accuracy but is reported apart."""
    judged = [s for s in solutions if s.reference is not None]
    right = sum(1 for s in judged if s.correct)
    return {"judged": len(judged), "correct": right, "no_answer": sum(1 for s in judged if s.answer is None),
            "accuracy": right / len(judged) if judged else None}


# ---- reporting (used by `stand solve`) ------------------------------------------------------------

def verdict(sol: Solution) -> str:
    if sol.answer is None:
        return "no answer"
    return {True: "correct", False: "wrong", None: "no reference"}[sol.correct]


def solution_line(i: int, total: int, sol: Solution) -> str:
    share = f"{round(sol.vote_share * len(sol.samples))}/{len(sol.samples)} votes"
    ref = f" (reference: {sol.reference})" if sol.reference is not None else ""
    acc = sum(s.stats["new_tokens"] for s in sol.samples) / max(sum(s.stats["steps"] for s in sol.samples), 1)
    return (f"[{i + 1}/{total}] {sol.id}: {sol.answer if sol.answer is not None else '-'} [{share}] "
            f"{verdict(sol)}{ref} | {sol.new_tokens} tokens in {sol.seconds:.1f}s, {sol.tok_per_s:.1f} tok/s, "
            f"{acc:.2f} tokens/step, {sol.schedule}")


def summary_lines(solutions: list[Solution], method: str) -> list[str]:
    acc = accuracy(solutions)
    toks, secs = sum(s.new_tokens for s in solutions), sum(s.seconds for s in solutions)
    lines = []
    if acc["judged"]:
        lines.append(f"accuracy {acc['correct']}/{acc['judged']} = {acc['accuracy']:.3f} "
                     f"({acc['no_answer']} without an answer)")
    lines.append(f"[{method}] {toks} tokens in {secs:.1f}s = {toks / max(secs, 1e-9):.1f} tok/s")
    lines.append("tokens/step by sample index: " + " ".join(f"{a:.2f}" for a in acceptance_by_index(solutions)))
    return lines


def write_json(solutions: list[Solution], path: str, config: dict | None = None) -> None:
    """Every question with every sample (text, answer, score, stats, per-token log-probs)."""
    with open(path, "w") as f:
        json.dump({"config": config or {}, "accuracy": accuracy(solutions),
                   "acceptance_by_index": acceptance_by_index(solutions),
                   "solutions": [s.as_dict() for s in solutions]}, f, indent=1)
