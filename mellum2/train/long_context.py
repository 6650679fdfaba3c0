"""The long-context stage (Mellum 2 §4): extend a trained checkpoint's context with YaRN on the
full-attention layers only, then keep training on long rows (mellum2.data.longctx).

    mellum2 train --stage long-context --from runs/tiny --rope-factor 8 --seq-len 4096 --max-steps 200

`--from` is a checkpoint directory (config.json + safetensors) or a training run directory (its newest
checkpoint). The original context is the checkpoint's `max_position_embeddings` unless
`--original-context` says otherwise (a base trained on shorter rows than its config allows).
`--rope-layers` picks where YaRN goes: `full` (the Mellum 2 recipe), `all` (uniform YaRN, the ablation's
alternative) or `none` (plain RoPE everywhere, only the context length grows). Weights are copied
unchanged; only the rotary tables change, so config.json carries the per-layer-type
`rope_parameters` exactly as the released 128K checkpoint does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mellum2.model import ModelConfig, load_pretrained, resolve_model_dir

from .errors import TrainError

ROPE_LAYERS = {"full": ("full_attention",), "all": ("full_attention", "sliding_attention"), "none": ()}


def source_dir(path: str) -> Path:
    return resolve_model_dir(path, "--from")


def extended_config(src: Path, factor: float, rope_layers: str, original: int | None):
    """The source checkpoint's config with its context extended `factor` times."""
    if original is not None and original < 16:
        raise TrainError(f"--original-context must be >= 16 (got {original})")
    cfg = ModelConfig.from_hf(src)
    if original is not None:
        cfg = cfg.replace(max_position_embeddings=original)
    layers = tuple(lt for lt in ROPE_LAYERS[rope_layers] if lt in set(cfg.layer_types))
    return cfg.extend_context(factor, layers)


def load_extended(src: Path, cfg):
    """The source's weights (MTP head included), loaded once into a model built for `cfg`."""
    return load_pretrained(src, dtype=torch.float32, cfg=cfg).train()
