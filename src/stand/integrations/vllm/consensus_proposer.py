"""Consensus drafting as a vLLM proposer: the rows that share a prompt (the n samples of a request) draft for each
other through drafters/consensus.py: the row's last k tokens are looked up in every sample of the group and in
the prompt, the continuations are merged into a DAG, and the best path is the chain vLLM verifies.

vLLM shows the proposer token ids only, so the edges are weighted by frequency with every committed token's
probability taken as 1 (w = alpha + (1 - alpha) * frequency), not by the target's probabilities.
"""

from __future__ import annotations

from dataclasses import asdict

from stand.drafters.consensus import ConsensusDrafter, ConsensusOptions
from stand.integrations.vllm.proposer import ChainProposer
from stand.params import SpecConfig


class ConsensusProposer(ChainProposer):
    method = "consensus"
    Options = ConsensusOptions

    def make_drafter(self) -> ConsensusDrafter:
        return ConsensusDrafter(SpecConfig(method="consensus", options=asdict(self.options)), self.limits.vocab_size)
