"""The generated `arithmetic` dataset (tts/arithmetic.py) and the single-sample accuracy beside the vote's."""

from __future__ import annotations

import json
import re

import pytest

from stand.errors import StandError
from stand.tts import arithmetic as arith
from stand.tts.answers import extract_answer, is_correct
from stand.tts.problems import ARITHMETIC_INSTRUCTION, ARITHMETIC_SUFFIX, Problem, arithmetic, load_dataset
from stand.tts.report import sample_accuracy, summary_lines, write_json
from stand.tts.solve import SolveConfig, decide
from stand.tts.vote import ScoredSample


def recompute(text: str) -> tuple[int, list[int]]:
    """The answer read back from the words alone (not from the generator's steps), with every count on the way."""
    if "altogether" in text:
        counts = [int(k) for k in re.findall(r"[A-Z][a-z]+ has (\d+) [a-z]+", text)]
        return sum(counts), counts
    sentences = re.findall(r"[^.?]+[.?]", text)
    count = int(re.fullmatch(r"[A-Z][a-z]+ has (\d+) [a-z]+\.", sentences[0]).group(1))
    seen = [count]
    for s in sentences[1:-1]:
        if m := re.search(r"finds (\d+) more", s):
            count += int(m[1])
        elif m := re.search(r"gives (\d+) [a-z]+ to [A-Z]", s):
            count -= int(m[1])
        elif m := re.search(r"buys (\d+) boxes with (\d+) [a-z]+ in each box", s):
            count += int(m[1]) * int(m[2])
        else:
            raise AssertionError(f"a sentence the test cannot read: {s!r}")
        seen.append(count)
    assert sentences[-1].strip().startswith("How many")
    return count, seen


@pytest.mark.parametrize("level", sorted(arith.LEVELS))
def test_answers_are_exact(level):
    problems = arithmetic(100, level=level, seed=3)
    for p in problems:
        assert p.prompt == ARITHMETIC_INSTRUCTION + p.meta["question"] + ARITHMETIC_SUFFIX
        value, counts = recompute(p.meta["question"])
        assert p.answer == str(value), p.meta["question"]
        assert min(counts) > 0  # nobody gives away what they do not have
        assert len(counts) == arith.LEVELS[level].steps + 1


def test_same_seed_same_problems_and_prefix_stable():
    a, b = arithmetic(30, seed=7), arithmetic(30, seed=7)
    assert [(p.id, p.prompt, p.answer) for p in a] == [(p.id, p.prompt, p.answer) for p in b]
    assert [p.prompt for p in arithmetic(5, seed=7)] == [p.prompt for p in a[:5]]  # the limit does not reshuffle
    other = arithmetic(30, seed=8)
    assert sum(p.prompt != q.prompt for p, q in zip(a, other)) >= 25
    assert len({p.prompt for p in a}) >= 28 and len({p.id for p in a}) == 30
    assert len(arithmetic()) == arith.DEFAULT_SIZE


def test_levels_differ():
    def numbers(level):
        return [[int(k) for k in re.findall(r"\d+", p.meta["question"])] for p in arithmetic(200, level=level)]

    per_level = {lv: numbers(lv) for lv in sorted(arith.LEVELS)}
    mean_count = {lv: sum(map(len, ns)) / len(ns) for lv, ns in per_level.items()}
    largest = {lv: max(max(n) for n in ns) for lv, ns in per_level.items()}
    answers = {lv: sum(int(p.answer) for p in arithmetic(200, level=lv)) / 200 for lv in per_level}
    assert mean_count[1] < mean_count[2] < mean_count[3]  # more steps
    assert largest[1] <= largest[2] < largest[3]  # larger numbers
    assert answers[1] < answers[2] < answers[3]
    assert all(max(n) <= 9 and min(n) >= 2 for n in per_level[1])


def test_load_dataset_names():
    assert [p.prompt for p in load_dataset("arithmetic", 4)] == [p.prompt for p in arithmetic(4)]
    assert [p.answer for p in load_dataset("arithmetic:3", 4)] == [p.answer for p in arithmetic(4, level=3)]
    assert [p.prompt for p in load_dataset("arithmetic:2:11", 3)] == [p.prompt for p in arithmetic(3, level=2, seed=11)]
    assert load_dataset("arithmetic:2", 1, instruction="Q: ")[0].prompt.startswith("Q: ")
    assert arithmetic(1, instruction="", suffix="")[0].prompt == arithmetic(1)[0].meta["question"]
    assert load_dataset("arithmetic:2", 1)[0].category == "level 2"
    for bad in ("arithmetic:9", "arithmetic:0", "arithmetic:x", "arithmetic:1:2:3", "arithmetic:"):
        with pytest.raises(StandError, match="arithmetic"):
            load_dataset(bad, 2)
    with pytest.raises(StandError, match="level"):
        arith.generate(0, level=4)


def test_answers_are_found_by_the_extractor():
    for p in arithmetic(20, level=3):
        assert is_correct(extract_answer(f"So the total is {p.answer}.\n\\boxed{{{p.answer}}}"), p.answer)
        assert not is_correct(extract_answer(f"\\boxed{{{int(p.answer) + 1}}}"), p.answer)


# ---- single-sample accuracy beside the vote's -------------------------------------------------------

def sample(i: int, answer: str | None) -> ScoredSample:
    return ScoredSample(f"... \\boxed{{{answer}}}", [1, 2], "stop", {"new_tokens": 2, "steps": 2}, 0, i,
                        answer=answer, key=answer, score=0.0)


def solutions():
    config = SolveConfig(n=4)
    a = decide(Problem("a", "q", "10"), [sample(i, x) for i, x in enumerate(["10", "7", "7", None])], config,
               "batched", 1.0)  # one sample right, the vote wrong
    b = decide(Problem("b", "q", "5"), [sample(i, x) for i, x in enumerate(["5", "5", "3", "3"])], config,
               "batched", 1.0)  # two right, the tie goes to the first answer given: right
    c = decide(Problem("c", "q", None), [sample(i, "1") for i in range(4)], config, "batched", 1.0)  # not judged
    return [a, b, c]


def test_summary_shows_both_accuracies(tmp_path):
    sols = solutions()
    assert (sols[0].correct, sols[1].correct) == (False, True)
    assert sample_accuracy(sols) == {"samples": 8, "correct": 3, "no_answer": 1, "accuracy": 3 / 8}
    line = summary_lines(sols, "none")[0]
    assert "self-consistency@4 1/2 = 0.500 (0 without an answer)" in line
    assert "single sample 3/8 = 0.375 (1 without an answer)" in line
    write_json(sols, tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["accuracy"]["accuracy"] == 0.5 and data["single_sample_accuracy"]["accuracy"] == 0.375
    assert not any(line.startswith("accuracy") for line in summary_lines(sols[2:], "none"))  # nothing to judge
