"""Step scorers for tree search: how good a candidate reasoning step is, higher is better.

A scorer is any `scorer(question, steps_so_far, step) -> float` (strings: the question as asked, the beam's steps
before this one, the new step). Two come with stand:

- the default, `MEAN_LOGPROB`: the step's mean token log-probability under the model (T=1), read from what the
  engine recorded while decoding the step, so it costs no extra forward pass;
- `RewardModel(path)`: a Hugging Face sequence-classification model directory (a reward model or a process reward
  model with such a head), run with transformers on the question and the partial solution (steps so far plus the
  step). The conversation goes through the model's chat template when its tokenizer has one (the question as the
  user's turn, the partial solution as the assistant's), else it is the question, a blank line and the solution. The
  score is read from the classification head at the last token, as Hugging Face's sequence-classification models
  pool it (the last token that is not padding): with one label, that logit; with two or more, the log-probability
  of label 1 (the "good step" label of two-label process reward heads).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Protocol

import torch

from stand.errors import StandError

StepScorer = Callable[[str, list[str], str], float]  # (question, steps so far, step) -> score, higher is better


class StepLogprobs(Protocol):
    logprobs: list[float]


class MeanLogprob:
    """The step's mean token log-probability under the model (T=1), from the log-probabilities recorded while the
    engine decoded it; -inf for a step without tokens."""

    def of(self, step: StepLogprobs) -> float:
        return sum(step.logprobs) / len(step.logprobs) if step.logprobs else float("-inf")

    def __repr__(self) -> str:
        return "mean-logprob"


MEAN_LOGPROB = MeanLogprob()


class RewardModel:
    """A Hugging Face sequence-classification model directory as a step scorer (see the module docstring)."""

    def __init__(self, path: str, max_tokens: int | None = None):
        self.path = path
        self.tokenizer, self.model = load_reward_model(path)
        self.labels = int(self.model.config.num_labels)
        self.max_tokens = max_tokens  # the most tokens of the scored text kept (its end); None: the model's limit

    def text(self, question: str, steps: list[str], step: str) -> str:
        solution = "".join(steps) + step
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}, {"role": "assistant", "content": solution}], tokenize=False)
        return f"{question}\n\n{solution}"

    def ids(self, question: str, steps: list[str], step: str) -> torch.Tensor:
        """[1, T] token ids of the scored text (the chat template brings its own special tokens)."""
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        ids = self.tokenizer(self.text(question, steps, step), add_special_tokens=not chat)["input_ids"]
        limit = self.max_tokens or getattr(self.model.config, "max_position_embeddings", None)
        return torch.tensor([ids[-limit:] if limit else ids])

    @torch.inference_mode()
    def __call__(self, question: str, steps: list[str], step: str) -> float:
        logits = self.model(input_ids=self.ids(question, steps, step)).logits[0].float()  # [labels]
        if self.labels == 1:
            return float(logits[0])
        return float(torch.log_softmax(logits, dim=-1)[1])

    def __repr__(self) -> str:
        return f"reward-model:{self.path}"


def load_reward_model(path: str):
    """(tokenizer, model) of a sequence-classification model directory; a StandError in one line otherwise."""
    what = f"scorer {path!r} is not a Hugging Face sequence-classification model directory"
    if not os.path.isdir(path):
        raise StandError(f"{what} (no such directory)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise StandError(f"{what} (no config.json in it)")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stand.backends.torch import quiet_transformers

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for what is not a model
        lines = str(e).strip().splitlines()
        raise StandError(f"{what} ({type(e).__name__}: {lines[0][:200] if lines else ''})") from None
    return tokenizer, model.eval()


def resolve_scorer(scorer: StepScorer | str | None) -> StepScorer | MeanLogprob:
    """The scorer a search uses: None -> MEAN_LOGPROB, a path -> RewardModel(path), a callable as it is."""
    if scorer is None or scorer is MEAN_LOGPROB:
        return MEAN_LOGPROB
    if isinstance(scorer, (str, os.PathLike)):
        return RewardModel(os.fspath(scorer))
    if not callable(scorer):
        raise StandError("scorer must be a callable (question, steps_so_far, step) -> float or a model directory")
    return scorer


def checked_score(value, scorer) -> float:
    """A scorer's answer as a float; a StandError when it is not a number (NaN included)."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise StandError(f"scorer {scorer!r} returned {value!r}, not a number") from None
    if math.isnan(score):
        raise StandError(f"scorer {scorer!r} returned NaN")
    return score
