"""STAND + consensus: the STAND tree, with the consensus draft grafted where it adds new paths.

The consensus draft (a deterministic chain, or small tree) is walked down the STAND tree from the
root: while its token equals a child of the current node, it follows that child; from the first
token that is no child there, the rest of it becomes a new branch (one-hot q). A grafted node
comes after the STAND siblings it joins, so the verifier tries it last at that node: recursive
rejection sampling stays exact, since the deterministic proposal is tried against the residual
left after the stochastic siblings, whatever they were. Both drafters observe the whole tree.
"""

from __future__ import annotations

from dataclasses import fields, make_dataclass, replace

from stand.core.tree import DraftTree, graft
from stand.core.drafter import Drafter
from stand.drafters.consensus import ConsensusDrafter
from stand.drafters.stand import StandDrafter

GRAFT = -2  # tag of grafted nodes (STAND counts template hits only for tags >= 0)


def union_options(name: str, *parts: type[Drafter]) -> type:
    """One options dataclass with the fields of every part's Options (no name may appear twice)."""
    specs = [(f.name, f.type, f.default) for part in parts for f in fields(part.Options)]
    names = [s[0] for s in specs]
    assert len(set(names)) == len(names), f"options of {name} clash: {names}"
    return make_dataclass(name, specs)


def part_config(config, part: type[Drafter]):
    """config with only the options the part declares."""
    own = {f.name for f in fields(part.Options)}
    return replace(config, options={k: v for k, v in config.options.items() if k in own})


class StandConsensus(Drafter):
    name = "stand+consensus"
    Options = union_options("StandConsensusOptions", StandDrafter, ConsensusDrafter)
    wants_probs = True

    def __init__(self, config, vocab_size: int):
        super().__init__(config, vocab_size)
        self.stand = StandDrafter(part_config(config, StandDrafter), vocab_size)
        self.consensus = ConsensusDrafter(part_config(config, ConsensusDrafter), vocab_size)
        self.grafted = 0  # nodes added to STAND trees
        self.graft_accepted = 0  # of those, nodes that were accepted

    def prepare(self, target) -> None:
        self.stand.prepare(target)

    def prompt_topk(self) -> int:
        return max(self.stand.prompt_topk(), self.consensus.prompt_topk())

    def start(self, row, prompt=None) -> None:
        self.stand.start(row, prompt)
        self.consensus.start(row, prompt)

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        """The STAND tree with the consensus chain grafted. Under a node budget (max_nodes: the pass's size, or an
        equal budget) the two share it, the chain up to half and STAND the rest, so the tree never holds more
        nodes than the pass asked (none when it asks for none)."""
        if max_nodes is None:
            chain, room = self.consensus.propose(row), None
        else:
            chain = self.consensus.propose(row, max_nodes // 2) if max_nodes > 1 else DraftTree()
            room = max_nodes - len(chain)
        tree, added = graft(self.stand.propose(row, room), chain, GRAFT)
        self.grafted += added
        return tree

    def acceptance_curve(self):
        return self.stand.acceptance_curve()

    def observe(self, row, tree, probs, verdict) -> None:
        self.graft_accepted += sum(tree.tags[i - 1] == GRAFT for i in verdict.accepted)
        self.stand.observe(row, tree, probs, verdict)
        self.consensus.observe(row, tree, probs, verdict)

    def finish(self, row) -> None:
        self.stand.finish(row)
        self.consensus.finish(row)

    def memory_bytes(self) -> int:
        return self.stand.memory_bytes() + self.consensus.memory_bytes()
