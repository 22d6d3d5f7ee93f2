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
up to num_speculative_tokens. Each token's estimate is the table's probability of it discounted for a context seen
few times (c observations: times c / (c + 1); a context seen once does not promise its continuation); chains.py
calibrates the estimates against what vLLM accepted and cuts the chains to what a step can afford.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from stand.core.drafter import PromptDists
from stand.drafters.ngram_table import NGramTable, tails_of
from stand.drafters.stand import StandDrafter, StandOptions, node_tails
from stand.integrations.vllm.proposer import ChainOptions, ChainProposer, committed_step
from stand.params import SpecConfig


CHAIN_FLOOR = 0.01  # a chain stops where the product of its estimates falls below this (select cuts it anyway)


@dataclass
class StandChainOptions(StandOptions, ChainOptions):
    share_across_prompts: bool = False  # one table for every request instead of one per prompt group
    table: str = ""  # a table file: loaded at start, saved when the last row using it leaves

    def __post_init__(self):
        StandOptions.__post_init__(self)
        ChainOptions.__post_init__(self)


def one_hot(tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each token as a distribution: ids [N, 1] and probabilities [N, 1] (all 1)."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
    return ids, np.ones(ids.shape)


def best_chain(table: NGramTable, tail: tuple, k: int, floor: float = CHAIN_FLOOR) -> tuple[list[int], list[float]]:
    """Up to k tokens and their estimates: the most likely stored next token after the longest stored suffix of tail
    (max_n ids, left-padded with -1), its probability times c / (c + 1) for a context seen c times; appended while
    the product of the estimates stays >= floor."""
    out, estimates, value = [], [], 1.0
    while len(out) < k:
        slot, _ = table.longest(tail)
        if slot < 0:
            break
        ids, p = table.dist(slot)
        if len(ids) == 0:
            break
        j, c = int(np.argmax(p)), float(table.counts[slot])
        estimate = float(p[j] / p.sum()) * c / (c + 1.0)
        value *= estimate
        if value < floor:
            break
        out.append(int(ids[j]))
        estimates.append(estimate)
        tail = tail[1:] + (int(ids[j]),)
    return out, estimates


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

    def chain(self, row, k: int) -> tuple[list[int], list[float]]:
        return best_chain(self.drafter.table_for(row), tuple(self._tail(row).tolist()), k)

    def _tail(self, row) -> np.ndarray:
        """[max_n] the row's last max_n tokens, left-padded with -1."""
        n = self.options.max_n
        return tails_of(row.tokens[-n:], n)[-1]
