"""kvserve: a fast, readable LLM inference and serving engine."""

from kvserve.config import EngineConfig
from kvserve.entrypoints.llm import LLM
from kvserve.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineConfig"]
