"""The target's distributions at the positions vLLM verified, for proposers that learn from them (STAND).

vLLM hands a custom proposer the target model once (`load_model(model)`). Every step's logits pass through the
model's logits layer (`model.logits_processor`, called by `compute_logits` on the positions the step samples at:
per batch row, one for its last token and one per draft token it was given). A forward hook on that layer keeps each
position's sampler distribution as its top-k, and the next propose call splits them per row when their number is
the one it expects from the rows and the drafts it gave them. A step where it is not (a row that was not scheduled,
a draft vLLM trimmed, a warm-up pass) is skipped: its rows then learn from their committed tokens only.

The proposer does not see each request's sampling settings, so the distribution is softmax(logits / temperature)
with the temperature given as an option (the one the requests use; 0: greedy, stored at temperature 1, as stand's
engine does).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)
KEEP_CALLS = 4  # logits calls kept between two propose calls (one per step; more with prompt logprobs)


class TargetDists:
    def __init__(self, topk: int, temperature: float):
        self.topk, self.temperature = topk, temperature
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []  # per logits call: ids [N, k], probs [N, k]
        self.attached = False

    def attach(self, model) -> bool:
        """Hooks the model's logits layer; False (and a log line) where the model has none."""
        layer = getattr(model, "logits_processor", None)
        if not isinstance(layer, torch.nn.Module):
            log.warning("stand: %s has no logits_processor layer: STAND learns from committed tokens only",
                        type(model).__name__)
            return False
        layer.register_forward_hook(self._hook)
        self.attached = True
        return True

    @torch.inference_mode()
    def _hook(self, module, inputs, logits) -> None:
        """logits [N, V] of the positions the step samples at -> their top-k sampler probabilities."""
        if logits is None or logits.ndim != 2 or len(self.calls) >= KEEP_CALLS:
            return
        x = logits.float()
        if self.temperature > 0:
            x = x / self.temperature
        vals, ids = torch.topk(torch.softmax(x, dim=-1), min(self.topk, x.shape[-1]), dim=-1)
        self.calls.append((ids.numpy().astype(np.int64), vals.double().numpy()))

    def take(self, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """The step's distributions per batch row (row i: sizes[i] positions, its last token's then its draft's),
        from the first logits call since the last take() with sum(sizes) positions; None if there is none."""
        calls, self.calls = self.calls, []
        total = sum(sizes)
        match = next((c for c in calls if len(c[0]) == total), None)
        if match is None:
            return None
        bounds = np.cumsum([0] + sizes)
        return [(match[0][a:b], match[1][a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
