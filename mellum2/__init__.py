"""mellum2: Mellum 2 (JetBrains' 12B-total / 2.5B-active MoE code model) from scratch in PyTorch."""
from .model import CheckpointError, ConfigError, Mellum2, ModelConfig, load_pretrained

__version__ = "0.1.0"

__all__ = ["ModelConfig", "ConfigError", "Mellum2", "load_pretrained", "CheckpointError"]
