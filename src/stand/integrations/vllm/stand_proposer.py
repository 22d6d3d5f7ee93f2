"""STAND as a vLLM proposer: the logit n-gram table of drafters/stand.py, one per prompt group (the n samples of a
request; option share_across_prompts: one for every request; option table: a file kept across restarts), drafting
the best chain through the table, since vLLM verifies chains.

What fills the table: vLLM 0.32 shows a custom proposer token ids only, not the target's distributions (custom
logits processors are not applied at the draft positions of a verification pass, and requested logprobs go to
the client), so every committed token is inserted as a one-hot distribution under each suffix of its context
(orders 1..max_n), and the prompt's tokens once per group when the group starts. The table then holds how often
each token followed each context in the group's text, merged by the same running mean as the target's
distributions are in our engine.

The chain: from the row's context, the most likely stored token of the longest matching suffix, appended, again,
while the product of the table's probabilities along the chain (its estimated chance of being accepted whole)
stays at least min_prob, up to num_speculative_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from stand.core.drafter import PromptDists
from stand.drafters.ngram_table import NGramTable, tails_of
from stand.drafters.stand import StandDrafter, StandOptions, node_tails
from stand.errors import StandError
from stand.integrations.vllm.proposer import ChainProposer, committed_step
from stand.params import SpecConfig


@dataclass
class StandChainOptions(StandOptions):
    min_prob: float = 0.1  # the chain stops where its estimated chance of acceptance falls below this
    share_across_prompts: bool = False  # one table for every request instead of one per prompt group
    table: str = ""  # a table file: loaded at start, saved when the last row using it leaves

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.min_prob <= 1.0:
            raise StandError(f"min_prob must be in [0, 1], got {self.min_prob}")


def one_hot(tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each token as a distribution: ids [N, 1] and probabilities [N, 1] (all 1)."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
    return ids, np.ones(ids.shape)


def best_chain(table: NGramTable, tail: tuple, k: int, min_prob: float) -> list[int]:
    """Up to k tokens: the most likely stored next token after the longest stored suffix of tail (max_n ids,
    left-padded with -1), appended while the product of their probabilities stays >= min_prob."""
    out, value = [], 1.0
    while len(out) < k:
        slot, _ = table.longest(tail)
        if slot < 0:
            break
        ids, p = table.dist(slot)
        if len(ids) == 0:
            break
        j = int(np.argmax(p))
        value *= float(p[j] / p.sum())
        if value < min_prob:
            break
        out.append(int(ids[j]))
        tail = tail[1:] + (int(ids[j]),)
    return out


class StandProposer(ChainProposer):
    method = "stand"
    Options = StandChainOptions

    def make_drafter(self) -> StandDrafter:
        o = self.options
        own = {f.name: getattr(o, f.name) for f in fields(StandOptions)}
        spec = SpecConfig(method="stand", share_across_prompts=o.share_across_prompts, table_path=o.table or None,
                          options=own)
        self.prompted: set[int] = set()  # groups whose prompt is in the table
        return StandDrafter(spec, self.limits.vocab_size)

    def start(self, row) -> None:
        prompt = None
        if row.group not in self.prompted and row.prompt_len > 1:
            self.prompted.add(row.group)
            ids, probs = one_hot(row.prompt[1:])
            prompt = PromptDists(ids, probs, np.ones(len(ids)))
        self.drafter.start(row, prompt)

    def observe(self, row, new: list[int]) -> None:
        tree, _ = committed_step(new)
        tails = node_tails(self._tail(row), tree)  # [len(new), max_n]: the context of each committed token
        self.drafter.table_for(row).insert(tails, *one_hot(new))

    def chain(self, row, k: int) -> list[int]:
        return best_chain(self.drafter.table_for(row), tuple(self._tail(row).tolist()), k, self.options.min_prob)

    def _tail(self, row) -> np.ndarray:
        """[max_n] the row's last max_n tokens, left-padded with -1."""
        n = self.options.max_n
        return tails_of(row.tokens[-n:], n)[-1]
