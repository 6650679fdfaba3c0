"""Inference: KV cache, sampling, the engine, MTP self-speculative decoding, FIM completion, CLI
(docs/inference.md)."""
from .api import generate, generate_stream
from .engine import Delta, Engine, Result, Stats
from .fim import complete, demo_completion
from .sampling import SamplingParams

__all__ = ["generate", "generate_stream", "complete", "demo_completion", "Engine", "SamplingParams", "Result",
           "Stats", "Delta"]
