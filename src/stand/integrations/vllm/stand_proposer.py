"""STAND as a vLLM proposer: the logit n-gram table of drafters/stand.py, one per prompt group (the n samples of a
request; option share_across_prompts: one for every request; option table: a file kept across restarts), drafting
the best chain through the table, since vLLM verifies chains.

What fills the table: by default the tokens vLLM committed, each inserted as a one-hot distribution under every
suffix of its context (orders 1..max_n), and the prompt's tokens once per group; the table then holds how often each
token followed each context in the group's text, merged by the running mean our engine uses for the target's
distributions. vLLM's propose() interface shows token ids only (logits processors are not applied at the draft
positions of a verification pass, and requested logprobs go to the client), but vLLM hands the proposer the target
model in load_model(), and with option target_dists a forward hook on the model's logits layer keeps each step's
distributions (target_dists.py): each row's distributions after its last token and after every draft token
(accepted or not: the contexts are real) go into the table instead, as STAND prescribes, where a step's logits can
be matched to its rows. That costs a softmax over the vocabulary for every row and draft position of every step,
and is off by default because it did not pay where measured (docs/results.md#vllm-proposer-options).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from stand.core.drafter import PromptDists
from stand.drafters.ngram_table import NGramTable, last_tail
from stand.drafters.stand import StandDrafter, StandOptions, node_tails
from stand.core.tree import DraftTree
from stand.integrations.vllm.proposer import ChainOptions, ChainProposer, committed_step
from stand.integrations.vllm.target_dists import TargetDists
from stand.params import SpecConfig


CHAIN_FLOOR = 0.01  # a chain stops where the product of its estimates falls below this (select cuts it anyway)


@dataclass
class StandChainOptions(StandOptions, ChainOptions):
    max_n: int = 8  # longer contexts than in our engine's trees: a chain's later tokens lean on them
    share_across_prompts: bool = False  # one table for every request instead of one per prompt group
    table: str = ""  # a table file: loaded at start, saved when the last row using it leaves
    target_dists: bool = False  # fill the table from the target's distributions instead (see above)
    temperature: float = 1.0  # the requests' temperature: the table stores softmax(logits / T) (0: greedy, T=1)

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
        own["own_latest"] = False  # chains are inserted into and drawn from the question's table only (not measured here)
        spec = SpecConfig(method="stand", share_across_prompts=o.share_across_prompts, table_path=o.table or None,
                          options=own)
        self.prompted: set[int] = set()  # groups whose prompt is in the table
        self.dists = TargetDists(o.topk, o.temperature)
        self.step_dists: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row uid -> this step's distributions
        self.inserts: list[tuple[NGramTable, np.ndarray, np.ndarray, np.ndarray]] = []  # this step's, for flush()
        return StandDrafter(spec, self.limits.vocab_size)

    def load_model(self, model=None, *args, **kwargs) -> None:
        """vLLM's target model: its logits layer is hooked so the table learns the target's distributions."""
        if self.options.target_dists and model is not None:
            self.dists.attach(model)

    def prepare(self, steps) -> None:
        """Splits the step's captured distributions per row: 1 + the draft each row was given."""
        self.step_dists = {}
        if not self.dists.attached:
            return
        sizes = [1 + (len(self.pending[s.row.uid].tokens) if s is not None and s.row.uid in self.pending else 0)
                 for s in steps]
        blocks = self.dists.take(sizes)
        if blocks is not None:
            self.step_dists = {s.row.uid: b for s, b in zip(steps, blocks) if s is not None}

    def start(self, row) -> None:
        prompt = None
        if row.group not in self.prompted and row.prompt_len > 1:
            self.prompted.add(row.group)
            ids, probs = one_hot(row.prompt[1:])
            prompt = PromptDists(ids, probs, np.ones(len(ids)))
        self.drafter.start(row, prompt)

    def observe(self, row, new: list[int], draft: list[int]) -> None:
        """The target's distributions after the row's last token and each draft token where the step's logits
        were matched to its rows, else the committed tokens one-hot."""
        block = self.step_dists.pop(row.uid, None)
        table = self.drafter.table_for(row)
        if block is not None and len(block[0]) == len(draft) + 1:
            tails = node_tails(self._tail(row), DraftTree.chain(draft))  # [len(draft) + 1, max_n]
            self.inserts.append((table, tails, *block))
            return
        tree, _ = committed_step(new)
        tails = node_tails(self._tail(row), tree)  # [len(new), max_n]: the context of each committed token
        self.inserts.append((table, tails, *one_hot(new)))

    def flush(self) -> None:
        """The step's inserts, one call per table and width (rows of a group share a table): fewer, larger merges."""
        groups: dict[tuple[int, int], list] = {}
        for table, tails, ids, probs in self.inserts:
            groups.setdefault((id(table), ids.shape[1]), []).append((table, tails, ids, probs))
        for parts in groups.values():
            parts[0][0].insert(*(np.concatenate([p[i] for p in parts]) for i in (1, 2, 3)))
        self.inserts = []

    def chain(self, row, k: int) -> tuple[list[int], list[float]]:
        return best_chain(self.drafter.table_for(row), tuple(self._tail(row).tolist()), k)

    def _tail(self, row) -> np.ndarray:
        """[max_n] the row's last max_n tokens, left-padded with -1."""
        return last_tail(row.tokens, self.options.max_n)
