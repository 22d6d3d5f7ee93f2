"""Generated arithmetic word problems with exact integer answers: a dataset small models can sometimes solve.

`generate(index, level, seed)`. Problem i of a (level, seed) pair comes from its own random stream, so it
is the same whatever the number of problems asked for; the same seed always gives the same problems.
Levels, with SmolLM2-135M-Instruct's single-sample accuracy (T=0.6, 256 tokens, 10 problems x 4 samples):

1. two people's counts added ("Sam has 4 apples and Mia has 7 apples. How many apples do they have
   altogether?"), numbers 2..9: 14/40 (seed 0) and 8/40 (seed 1). One step is what the default model gets
   right sometimes: even "What is 4 + 7 + 5?" it gets right about one time in twenty;
2. three people's counts added (two additions), numbers 2..9: 0/40;
3. a story of a start and four events (finds more, gives some to someone, buys boxes of k items each),
   numbers 2..30.

Every count in a story stays positive. Answers are computed with the events, never parsed from text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from stand.errors import StandError

NAMES = ("Sam", "Mia", "Ben", "Lily", "Tom", "Emma", "Leo", "Ava", "Max", "Zoe", "Noah", "Ella")
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cards", "shells", "stamps", "cookies", "toys")
DEFAULT_SIZE = 200  # problems when no limit is given


@dataclass(frozen=True)
class Level:
    """How hard the problems of a level are."""

    form: str  # "together": people's counts summed; "story": one person's count through events
    steps: int  # operations from the first number to the answer
    low: int  # smallest number in the text
    high: int  # largest number in the text (a starting count, an amount found or given)
    events: tuple[str, ...] = ()  # story events to draw from: "find", "give", "boxes"


LEVELS = {
    1: Level("together", 1, 2, 9),
    2: Level("together", 2, 2, 9),
    3: Level("story", 4, 2, 30, ("find", "give", "boxes")),
}


@dataclass
class Generated:
    text: str  # the question, without instruction
    answer: int
    steps: list[tuple[str, int]]  # (operation, operand) in order: ("start", 5), ("add", 3), ("sub", 2), ...


def generate(index: int, level: int = 1, seed: int = 0) -> Generated:
    """Problem `index` of `level` under `seed`: the same inputs always give the same problem."""
    spec = level_spec(level)
    rng = random.Random(f"arithmetic:{seed}:{level}:{index}")
    names, item = rng.sample(NAMES, 4), rng.choice(ITEMS)
    if spec.form == "together":
        return _together(rng, spec, names, item)
    return _story(rng, spec, names, item)


def level_spec(level: int) -> Level:
    if level not in LEVELS:
        raise StandError(f"arithmetic level must be one of {', '.join(map(str, LEVELS))}, got {level}")
    return LEVELS[level]


def _together(rng: random.Random, spec: Level, names: list[str], item: str) -> Generated:
    counts = [rng.randint(spec.low, spec.high) for _ in range(spec.steps + 1)]
    parts = [f"{name} has {k} {item}" for name, k in zip(names, counts)]
    text = f"{', '.join(parts[:-1])} and {parts[-1]}. How many {item} do they have altogether?"
    return Generated(text, sum(counts), [("start", counts[0])] + [("add", k) for k in counts[1:]])


def _story(rng: random.Random, spec: Level, names: list[str], item: str) -> Generated:
    who, others = names[0], names[1:]
    count = rng.randint(max(spec.low, spec.high // 2), spec.high)
    sentences, steps = [f"{who} has {count} {item}."], [("start", count)]
    while len(steps) <= spec.steps:
        event = rng.choice(spec.events)
        if event == "give" and count <= spec.low:
            continue  # keep every count positive
        sentence, op, value = _event(rng, event, spec, who, rng.choice(others), item, count)
        sentences.append(sentence)
        steps.append((op, value))
        count = count + value if op == "add" else count - value
    sentences.append(f"How many {item} does {who} have now?")
    return Generated(" ".join(sentences), count, steps)


def _event(rng: random.Random, event: str, spec: Level, who: str, other: str, item: str,
           count: int) -> tuple[str, str, int]:
    """(sentence, operation, operand) of one story event."""
    if event == "find":
        k = rng.randint(spec.low, spec.high)
        return f"Then {who} finds {k} more {item}.", "add", k
    if event == "give":
        k = rng.randint(1, min(count - 1, spec.high))
        return f"Then {who} gives {k} {item} to {other}.", "sub", k
    boxes, each = rng.randint(2, 4), rng.randint(2, 6)
    return f"Then {who} buys {boxes} boxes with {each} {item} in each box.", "add", boxes * each
