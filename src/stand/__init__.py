"""stand: lossless model-free speculative decoding for test-time scaling."""

from stand.api import Sample, generate, load_target
from stand.errors import StandError
from stand.backends.load import load_model
from stand.backends.protocol import Backend
from stand.backends.torch import Target
from stand.params import SamplingParams, SpecConfig
from stand.tts.search import SearchConfig
from stand.tts.solve import solve

__all__ = ["generate", "solve", "Sample", "StandError", "Target", "Backend", "load_model", "load_target",
           "SamplingParams", "SpecConfig", "SearchConfig"]
__version__ = "0.1.0"
