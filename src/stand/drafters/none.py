"""Plain autoregressive decoding: an empty draft, one token per step."""

import numpy as np

from stand.core.drafter import Drafter


class NoDrafter(Drafter):
    name = "none"
    default_nodes = 0

    def acceptance_curve(self) -> np.ndarray:
        """One token per step, known in advance: the engine keeps no online curve and asks for no nodes."""
        return np.ones(1)
