"""The N-Grammys as a vLLM proposer: the first of drafters/ngrammys.py's drafts (the latest context match of the
longest suffix, completed by the model's bigram chain; without a match, the bigram chain of the last token), since
vLLM verifies one chain a step.

The bigram table comes from the target's weights: for every token alone, the model's most likely next tokens. The
proposer builds it once per model with transformers on CPU, from the directory vLLM serves (a second copy of the
model is in memory while it is built, about a minute for a 135M model on 2 cores), and keeps it in stand's cache
(ngrammys.model_tables), so later starts only read it. Option model_tables=false drafts from the context alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from stand.drafters.ngrammys import NGrammys, NGrammysOptions, model_tables
from stand.integrations.vllm.proposer import ChainOptions, ChainProposer
from stand.params import SpecConfig


@dataclass
class NGrammysChainOptions(NGrammysOptions, ChainOptions):
    model_tables: bool = True  # build (or read) the model's bigram table; False: context drafts only


def load_target(path: str):
    """The model at `path` as a stand torch Target in float32, without its tokenizer (the table needs logits)."""
    import torch
    from transformers import AutoModelForCausalLM

    from stand.backends.torch import Target, quiet_transformers

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return Target(model, None, path.rstrip("/").rsplit("/", 1)[-1], torch.float32)


class NGrammysProposer(ChainProposer):
    method = "ngrammys"
    Options = NGrammysChainOptions

    def make_drafter(self) -> NGrammys:
        own = {f.name: getattr(self.options, f.name) for f in fields(NGrammysOptions)}
        drafter = NGrammys(SpecConfig(method="ngrammys", options=own), self.limits.vocab_size)
        if self.options.model_tables:
            drafter.set_tables(model_tables(load_target(self.limits.model), progress=False))
        return drafter
