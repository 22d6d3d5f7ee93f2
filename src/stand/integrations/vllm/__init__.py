"""stand's drafters as vLLM speculative proposers (vLLM's `custom_class` method), vLLM's CPU sampler fix, and the
subprocess that runs vLLM for `stand bench` and `stand serve --engine vllm`.

One proposer per file: `stand_proposer.StandProposer`, `consensus_proposer.ConsensusProposer`,
`ngrammys_proposer.NGrammysProposer`. vLLM builds them in its worker with its config and asks each step for one
draft chain per row of the batch; vLLM verifies the chains with its own lossless rejection sampler. vLLM itself is
imported only inside the functions that need it (and in worker.py, which runs in vLLM's environment).
"""

PROPOSERS = {
    "stand": "stand.integrations.vllm.stand_proposer.StandProposer",
    "consensus": "stand.integrations.vllm.consensus_proposer.ConsensusProposer",
    "ngrammys": "stand.integrations.vllm.ngrammys_proposer.NGrammysProposer",
}
