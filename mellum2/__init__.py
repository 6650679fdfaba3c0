"""mellum2: Mellum 2 (JetBrains' 12B-total / 2.5B-active MoE code model) from scratch in PyTorch."""
from .model import CheckpointError, ConfigError, Mellum2, ModelConfig, load_pretrained


def __getattr__(name):  # the engine is imported on first use: `import mellum2` stays light
    if name in ("generate", "generate_stream", "complete", "Engine", "SamplingParams"):
        from . import infer

        return getattr(infer, name)
    raise AttributeError(f"module 'mellum2' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = ["ModelConfig", "ConfigError", "Mellum2", "load_pretrained", "CheckpointError", "generate",
           "generate_stream", "complete", "Engine", "SamplingParams"]
