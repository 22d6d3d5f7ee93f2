"""Plain autoregressive decoding: an empty draft, one token per step."""

from .base import Drafter


class NoDrafter(Drafter):
    name = "none"
