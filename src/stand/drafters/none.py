"""Plain autoregressive decoding: an empty draft, one token per step."""

from stand.core.drafter import Drafter


class NoDrafter(Drafter):
    name = "none"
