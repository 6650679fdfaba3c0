"""The Mellum 2 model: config, layers, MoE, transformer, MTP head, the training objective and HF
checkpoint I/O (docs/model.md)."""
from mellum2.locate import resolve_model_dir

from .config import ConfigError, ModelConfig
from .hf import CheckpointError
from .transformer import Mellum2, Output, init_weights, load_pretrained

__all__ = ["ModelConfig", "ConfigError", "Mellum2", "Output", "init_weights", "load_pretrained", "resolve_model_dir",
           "CheckpointError"]
