"""Consensus drafting as a vLLM proposer: the rows that share a prompt (the n samples of a request) draft for each
other through drafters/consensus.py: the row's last k tokens are looked up in every sample of the group and in
the prompt, the continuations are merged into a DAG, and the best path is the chain vLLM verifies.

vLLM shows the proposer token ids only, so the edges are weighted by frequency with every committed token's
probability taken as 1 (w = alpha + (1 - alpha) * frequency), not by the target's probabilities; each token's edge
weight is its estimate for chains.py's calibration.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from stand.drafters.consensus import ConsensusDrafter, ConsensusOptions, best_path_edges, build_dag
from stand.integrations.vllm.proposer import ChainOptions, ChainProposer
from stand.params import SpecConfig


@dataclass
class ConsensusChainOptions(ConsensusOptions, ChainOptions):
    pass


class ConsensusProposer(ChainProposer):
    method = "consensus"
    Options = ConsensusChainOptions

    def make_drafter(self) -> ConsensusDrafter:
        own = {f.name: getattr(self.options, f.name) for f in fields(ConsensusOptions)}
        return ConsensusDrafter(SpecConfig(method="consensus", options=own), self.limits.vocab_size)

    def chain(self, row, k: int) -> tuple[list[int], list[float]]:
        """The best path through the DAG of the group's continuations, with each edge's weight."""
        dag = build_dag(self.drafter.continuations(row, max(k, 1)))  # continuations as long as the chain asked
        edges = best_path_edges(dag, self.options.alpha)[:k] if dag.paths else []
        return [dag.tokens[v] for v, _ in edges], [min(w, 1.0) for _, w in edges]
