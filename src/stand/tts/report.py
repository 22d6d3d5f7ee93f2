"""What `stand solve` prints and writes: a line per question, a summary, every sample as JSON."""

from __future__ import annotations

import sys

from stand.core import files
from stand.tts.answers import is_correct
from stand.tts.solve import Solution, acceptance_by_index, accuracy


def verdict(sol: Solution) -> str:
    if sol.answer is None:
        return "no answer"
    return {True: "correct", False: "wrong", None: "no reference"}[sol.correct]


def solution_line(i: int, total: int, sol: Solution) -> str:
    share = f"{round(sol.vote_share * len(sol.samples))}/{len(sol.samples)} votes"
    if sol.rounds is not None:
        share = f"{len(sol.samples)} beams, {len(sol.rounds)} rounds, {sol.vote_share:.0%} of the weight"
    ref = f" (reference: {sol.reference})" if sol.reference is not None else ""
    return (f"[{i + 1}/{total}] {sol.id}: {sol.answer if sol.answer is not None else '-'} [{share}] "
            f"{verdict(sol)}{ref} | {sol.new_tokens} tokens in {sol.seconds:.1f}s, {sol.tok_per_s:.1f} tok/s, "
            f"{sol.mean_accepted:.2f} tokens/step, {sol.schedule}")


def sample_accuracy(solutions: list[Solution]) -> dict:
    """Single-sample accuracy: the mean over the samples of judged questions of each sample's own answer being
    right (a sample without an answer counts as wrong), i.e. what one sample per question would score."""
    samples = [(smp, sol.reference) for sol in solutions if sol.reference is not None for smp in sol.samples]
    right = sum(1 for smp, ref in samples if is_correct(smp.answer, ref))
    return {"samples": len(samples), "correct": right, "no_answer": sum(1 for smp, _ in samples if smp.answer is None),
            "accuracy": right / len(samples) if samples else None}


def accuracy_line(solutions: list[Solution]) -> str | None:
    """Accuracy at n (the strategy's answer) beside single-sample accuracy; None when nothing can be judged."""
    acc, one = accuracy(solutions), sample_accuracy(solutions)
    if not acc["judged"]:
        return None
    n = max(s.n or len(s.samples) for s in solutions)
    each = "finished beam" if solutions[0].rounds is not None else "single sample"
    return (f"accuracy {solutions[0].strategy}@{n} {acc['correct']}/{acc['judged']} = {acc['accuracy']:.3f} "
            f"({acc['no_answer']} without an answer) | {each} {one['correct']}/{one['samples']} = "
            f"{one['accuracy']:.3f} ({one['no_answer']} without an answer)")


def summary_lines(solutions: list[Solution], method: str) -> list[str]:
    toks, secs = sum(s.new_tokens for s in solutions), sum(s.seconds for s in solutions)
    line = accuracy_line(solutions)
    lines = [line] if line else []
    lines.append(f"[{method}] {toks} tokens in {secs:.1f}s = {toks / max(secs, 1e-9):.1f} tok/s")
    lines.append("tokens/step by sample index: " + " ".join(f"{a:.2f}" for a in acceptance_by_index(solutions)))
    return lines


def write_json(solutions: list[Solution], path: str, config: dict | None = None) -> None:
    """Every question with every sample (text, answer, score, stats, per-token log-probs)."""
    files.write_json(str(path), {"config": config or {}, "accuracy": accuracy(solutions),
                                 "single_sample_accuracy": sample_accuracy(solutions),
                                 "acceptance_by_index": acceptance_by_index(solutions),
                                 "solutions": [s.as_dict() for s in solutions]})


class TokenBar:
    """A progress bar (stderr) of tokens for the question being solved, opened at its first token; close() ends it."""

    def __init__(self, questions: int, tokens: int):
        self.questions, self.tokens, self.bar = questions, tokens, None

    def update(self, i: int, k: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.tokens, desc=f"{i + 1}/{self.questions}", unit="tok", file=sys.stderr, leave=False)
        self.bar.update(k)

    def round(self, i: int, r: int) -> None:
        """A search's round r of question i starts: the bar says so."""
        self.update(i, 0)
        self.bar.set_description(f"{i + 1}/{self.questions} round {r + 1}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
