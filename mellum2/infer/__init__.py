"""Inference: KV cache, sampling, the engine, MTP self-speculative decoding, FIM completion, CLI."""
from .api import generate, generate_stream
from .engine import Delta, Engine, Result, Stats
from .sampling import SamplingParams

__all__ = ["generate", "generate_stream", "Engine", "SamplingParams", "Result", "Stats", "Delta"]
