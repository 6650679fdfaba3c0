"""The Multi-Token-Prediction head (one layer), in the Qwen3-Next `mtp.*` layout.

The Mellum 2 report trains one MTP layer predicting token t+2 (weight 0.1) but does not say how the
head takes its inputs, and the released checkpoints carry no MTP weights. Our documented choice is
the Qwen3-Next layout, which vLLM/SGLang already load for other models:

    e_t   = pre_fc_norm_embedding(embed_tokens(x_{t+1}))      shared embedding
    g_t   = pre_fc_norm_hidden(h_t)                           h_t: trunk output *before* its final norm
    z_t   = fc(concat(e_t, g_t))                              Linear 2D -> D, embedding first
    z'_t  = decoder_layer(z_t)                                full attention (+ MoE when the trunk has it)
    logits_t = lm_head(norm(z'_t))                            shared LM head; predicts x_{t+2}

Keys: mtp.fc.weight, mtp.pre_fc_norm_embedding.weight, mtp.pre_fc_norm_hidden.weight,
mtp.layers.0.* (a decoder layer named like the trunk's), mtp.norm.weight; config
`num_nextn_predict_layers: 1`.

Why full attention for the MTP layer: a draft should see the whole context like the trunk's global
layers; its cache is one layer's worth (the cache index is `num_hidden_layers`). Why pre-norm h_t:
the head re-normalises it with its own weights, so the trunk's final norm stays the LM's alone.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import MaskCache, RMSNorm
from .decoder import DecoderLayer, packed_doc_ids


class MTP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.layer_type = cfg.mtp_layer_type
        self.pre_fc_norm_embedding = _norm(cfg)
        self.pre_fc_norm_hidden = _norm(cfg)
        self.fc = nn.Linear(2 * D, D, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(cfg, cfg.num_hidden_layers, cfg.mtp_layer_type, cfg.mtp_mlp_type)])
        self.norm = _norm(cfg)

    def forward(self, lm, h_BTD, next_ids_BT, position_ids_BT=None, cache=None, packed: bool | None = None):
        """h_BTD: trunk hidden states at positions t; next_ids_BT: tokens t+1. Returns the MTP layer's
        output [B, T, D] (before mtp.norm) and its router outputs."""
        B, T = next_ids_BT.shape
        e_BTD = self.pre_fc_norm_embedding(lm.model.embed_tokens(next_ids_BT))
        z_BTD = self.fc(torch.cat([e_BTD, self.pre_fc_norm_hidden(h_BTD).to(e_BTD.dtype)], dim=-1))
        pos_BT = position_ids_BT if position_ids_BT is not None else \
            torch.arange(T, device=z_BTD.device).expand(B, T)
        cos, sin = lm.rotary(pos_BT, self.layer_type, z_BTD.dtype if not torch.is_autocast_enabled(
            z_BTD.device.type) else torch.get_autocast_dtype(z_BTD.device.type))
        plan = None
        if cache is None:
            plan = MaskCache(lm.cfg, T, packed_doc_ids(position_ids_BT, packed), z_BTD.device).get(self.layer_type)
        y_BTD, r = self.layers[0](z_BTD, cos, sin, plan, cache)
        return y_BTD, ([r] if r is not None else [])

    def logits(self, lm, y_BTD):
        return lm.lm_head(self.norm(y_BTD)).float()


def _norm(cfg: ModelConfig) -> RMSNorm:
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
