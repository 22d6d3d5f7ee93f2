"""One drafter per file behind one interface (core/drafter.py); DRAFTERS maps --method to a class."""

from __future__ import annotations

import importlib

from stand.core.drafter import Drafter

# method name -> "module:Class", imported on first use
DRAFTERS: dict[str, str] = {
    "none": "none:NoDrafter",
    "pld": "pld:PromptLookup",
    "stand": "stand:StandDrafter",
    "stand-heuristic": "stand:HeuristicStandDrafter",
    "stand-dynamic": "stand:DynamicStandDrafter",
    "recycle": "recycle:TokenRecycling",
    "consensus": "consensus:ConsensusDrafter",
    "ngrammys": "ngrammys:NGrammys",
    "stand+consensus": "combined:StandConsensus",
    "suffix": "suffix:SuffixDrafter",
}


def make_drafter(config, vocab_size: int, target=None) -> Drafter:
    """target (optional): drafters that define prepare(target) build model-derived tables from it."""
    module, cls = DRAFTERS[config.method].split(":")
    drafter = getattr(importlib.import_module(f"stand.drafters.{module}"), cls)(config, vocab_size)
    if target is not None and hasattr(drafter, "prepare"):
        drafter.prepare(target)
    return drafter
