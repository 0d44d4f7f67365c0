"""The inference engine: paged KV cache, continuous batching, prefix caching and sampling.

`LLM` is the offline API, `AsyncEngine` the one the server streams from; both drive an `Engine`.
"""

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.config import EngineConfig
from kiln.engine.engine import Engine, EngineCounters
from kiln.engine.llm import LLM
from kiln.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kiln.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "EngineCounters",
    "Logprob",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
