"""What `stand solve` prints and writes: a line per question, a summary, every sample as JSON."""

from __future__ import annotations

import sys

from stand.core import files
from stand.tts.solve import Solution, acceptance_by_index, accuracy


def verdict(sol: Solution) -> str:
    if sol.answer is None:
        return "no answer"
    return {True: "correct", False: "wrong", None: "no reference"}[sol.correct]


def solution_line(i: int, total: int, sol: Solution) -> str:
    share = f"{round(sol.vote_share * len(sol.samples))}/{len(sol.samples)} votes"
    ref = f" (reference: {sol.reference})" if sol.reference is not None else ""
    return (f"[{i + 1}/{total}] {sol.id}: {sol.answer if sol.answer is not None else '-'} [{share}] "
            f"{verdict(sol)}{ref} | {sol.new_tokens} tokens in {sol.seconds:.1f}s, {sol.tok_per_s:.1f} tok/s, "
            f"{sol.mean_accepted:.2f} tokens/step, {sol.schedule}")


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
    files.write_json(str(path), {"config": config or {}, "accuracy": accuracy(solutions),
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
