"""The Mellum 2 model: config, layers, MoE, transformer, MTP head and HF checkpoint I/O."""
from .config import ConfigError, ModelConfig
from .hf import CheckpointError, load_pretrained, resolve_model_dir
from .transformer import Mellum2, Output, init_weights

__all__ = ["ModelConfig", "ConfigError", "Mellum2", "Output", "init_weights", "load_pretrained", "resolve_model_dir",
           "CheckpointError"]
