"""stand: lossless model-free speculative decoding for test-time scaling."""

from .api import Sample, generate
from .errors import StandError
from .models import Target, load_model
from .params import SamplingParams, SpecConfig
from .tts import solve

__all__ = ["generate", "solve", "Sample", "StandError", "Target", "load_model", "SamplingParams", "SpecConfig"]
__version__ = "0.1.0"
