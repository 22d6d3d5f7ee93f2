"""One drafter per file behind one interface (core/drafter.py); DRAFTERS maps each of our engine's methods
(stand/methods.py) to its drafter class."""

from __future__ import annotations

import importlib

from stand.core.drafter import Drafter
from stand.methods import METHODS

DRAFTERS: dict[str, str] = {name: m.target for name, m in METHODS.items() if m.engine == "stand"}  # "module:Class"


def make_drafter(config, vocab_size: int, target=None) -> Drafter:
    """target (optional): drafters that define prepare(target) build model-derived tables from it."""
    module, cls = DRAFTERS[config.method].split(":")
    drafter = getattr(importlib.import_module(f"stand.drafters.{module}"), cls)(config, vocab_size)
    if target is not None and hasattr(drafter, "prepare"):
        drafter.prepare(target)
    return drafter
