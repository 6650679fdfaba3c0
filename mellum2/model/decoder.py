"""One decoder layer (pre-norm attention, then the MLP: MoE or dense SwiGLU), shared by the trunk
(transformer.py) and the MTP head (mtp.py), and the document ids of packed rows that both use to plan
their attention masks.

Names follow the released checkpoint (`self_attn`, `mlp`, `input_layernorm`, `post_attention_layernorm`).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import Attention, RMSNorm, doc_ids_from_positions
from .moe import DenseMLP, MoE


class DecoderLayer(nn.Module):
    """Pre-norm: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, layer_type: str, mlp_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(cfg, layer_idx, layer_type)
        self.mlp = MoE(cfg) if mlp_type == "sparse" else DenseMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BTD, cos, sin, plan, cache=None):
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, plan, cache)
        y_BTD, router = self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD + y_BTD, router


def packed_doc_ids(position_ids_BT: torch.Tensor | None, packed: bool | None = None) -> torch.Tensor | None:
    """Document ids when a row packs several documents, else None (then no mask is needed).
    `packed` (known by a caller that saw the positions on the host: the trainer) skips the test
    here, which on a GPU is a host sync in every forward."""
    if packed is False:
        return None
    doc = doc_ids_from_positions(position_ids_BT)
    if doc is None or (packed is None and not bool((doc[:, -1] != 0).any())):
        return None
    return doc
