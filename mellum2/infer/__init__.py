"""Inference: KV cache, sampling, the engine (a scheduler of requests: continuous batching, chunked
prefill, prefix caching, MTP self-speculative decoding), FIM completion, CLI (docs/inference.md)."""
from .api import generate, generate_stream
from .engine import Engine
from .fim import complete, demo_completion
from .request import Delta, Result, Stats
from .sampling import SamplingParams

__all__ = ["generate", "generate_stream", "complete", "demo_completion", "Engine", "SamplingParams", "Result",
           "Stats", "Delta"]
