"""Prompt sources: CHAMP competition math (the champ-dataset package) and more."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

from .errors import StandError

MATH_INSTRUCTION = "Solve the following math problem step by step. Put the final answer in \\boxed{}.\n\n"


@dataclass
class Problem:
    id: str
    prompt: str  # what the model is asked (instruction included)
    answer: str | None = None  # the reference answer, where known
    category: str = ""


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise StandError(f"the dataset needs the package {package}: pip install {package.replace('_', '-')}")
    return os.path.join(os.path.dirname(spec.origin), *parts)


def champ(limit: int | None = None, instruction: str = MATH_INSTRUCTION) -> list[Problem]:
    """The 270 CHAMP problems in the package's order, with reference answers."""
    with open(_package_file("champ_dataset", "dataset_files", "v0.json")) as f:
        problems = json.load(f)["problems"]
    out = [Problem(pid, instruction + p["_text"], p["_answer"], p.get("category", ""))
           for pid, p in problems.items()]
    return out[:limit] if limit is not None else out


DATASETS = {"champ": champ}


def load_dataset(name: str, limit: int | None = None, **kwargs) -> list[Problem]:
    if name not in DATASETS:
        raise StandError(f"unknown dataset {name!r}; choose from {', '.join(sorted(DATASETS))}")
    if limit is not None and limit < 1:
        raise StandError(f"the number of problems must be >= 1, got {limit}")
    return DATASETS[name](limit, **kwargs)
