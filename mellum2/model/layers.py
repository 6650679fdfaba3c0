"""Norm, rotary tables (default and YaRN, per layer type) and GQA attention with QK-norm.

Follows transformers' `models/mellum` numerically: RMSNorm in fp32 then cast back before the weight;
cos/sin computed in fp32 from position ids and scaled by the YaRN attention factor; QK-norm over
head_dim before RoPE; a sliding window of `w` means a query sees keys at index distance < w.

Attention never crosses a document boundary in packed rows: a new document starts wherever
position_ids do not increase by exactly 1 (transformers' rule, so packed inputs agree with it).

Shapes: B batch, T query length, S key length, H query heads, G kv heads, d head_dim, D model width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, cast back to the input dtype before the weight (as transformers does)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight.to(x.dtype) * y


# ---------------------------------------------------------------------------- rotary tables
def rope_inv_freq(cfg: ModelConfig, layer_type: str) -> tuple[torch.Tensor, float]:
    """inv_freq [d/2] and the attention (cos/sin) scale of one layer type, exactly as transformers."""
    rp = cfg.rope_parameters[layer_type]
    base = float(rp["rope_theta"])
    dim = int(cfg.head_dim * rp.get("partial_rotary_factor", 1.0))
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)
    if rp.get("rope_type", "default") == "default":
        return 1.0 / pos_freqs, 1.0
    # YaRN (Peng et al. 2023): interpolate low frequencies by `factor`, keep high ones, linear ramp
    # between the dims that rotate beta_fast and beta_slow times over the original context.
    factor = float(rp["factor"])
    orig = rp["original_max_position_embeddings"]
    attn_factor = rp.get("attention_factor")
    if attn_factor is None:
        ms, msa = rp.get("mscale"), rp.get("mscale_all_dim")
        get = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        attn_factor = get(factor, ms) / get(factor, msa) if (ms and msa) else get(factor)
    beta_fast = rp.get("beta_fast") or 32
    beta_slow = rp.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    return inv, float(attn_factor)


class Rotary(nn.Module):
    """One inv_freq table per layer type; cos/sin are computed from position ids in fp32.

    The tables are plain fp32 tensors, not buffers, so `model.to(bfloat16)` cannot round them and a
    model built on the meta device still has them; they follow the position ids' device lazily."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.types = sorted(set(cfg.layer_types) | {cfg.mtp_layer_type})
        self.reset()

    def reset(self) -> None:
        """(Re)compute the tables, e.g. after the long-context stage changed rope_parameters."""
        self.tables = {lt: rope_inv_freq(self.cfg, lt) for lt in self.types}
        self._on: dict[tuple[str, torch.device], torch.Tensor] = {}

    def forward(self, position_ids_BT: torch.Tensor, layer_type: str, dtype: torch.dtype):
        inv, scale = self.tables[layer_type]
        key = (layer_type, position_ids_BT.device)
        if key not in self._on:
            self._on[key] = inv.to(position_ids_BT.device)
        with torch.autocast(position_ids_BT.device.type, enabled=False):
            freqs_BTf = position_ids_BT[..., None].float() * self._on[key]  # [B, T, d/2]
            emb = torch.cat((freqs_BTf, freqs_BTf), dim=-1)  # [B, T, d]
            return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTd[:, None], sin_BTd[:, None]
    return x_BHTd * cos + rotate_half(x_BHTd) * sin


# ---------------------------------------------------------------------------- masks
def doc_ids_from_positions(position_ids_BT: torch.Tensor | None) -> torch.Tensor | None:
    """Document index of every token ([B, T]), or None when each row is one document."""
    if position_ids_BT is None:
        return None
    first = position_ids_BT[:, :1] - 1
    starts = torch.diff(position_ids_BT, prepend=first, dim=-1) != 1
    return starts.cumsum(-1)


def attn_mask(T: int, window: int | None, doc_ids_BT: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean [B|1, 1, T, T] mask: causal, within `window` (index distance < window), same document."""
    i = torch.arange(T, device=device)
    m_TT = i[:, None] >= i[None, :]
    if window is not None:
        m_TT = m_TT & ((i[:, None] - i[None, :]) < window)
    if doc_ids_BT is None:
        return m_TT[None, None]
    same_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (m_TT[None] & same_BTT)[:, None]


class MaskCache:
    """Builds each layer type's mask once per forward pass (layers of a type share it)."""

    def __init__(self, cfg: ModelConfig, T: int, doc_ids_BT: torch.Tensor | None, device):
        self.cfg, self.T, self.doc, self.device = cfg, T, doc_ids_BT, device
        self._m: dict[str, torch.Tensor | None] = {}

    def get(self, layer_type: str) -> torch.Tensor | None:
        """None means 'plain causal' (SDPA's is_causal fast path)."""
        if layer_type not in self._m:
            w = self.cfg.window_of(layer_type)
            if w is not None and w >= self.T:
                w = None
            self._m[layer_type] = None if (w is None and self.doc is None) else attn_mask(
                self.T, w, self.doc, self.device)
        return self._m[layer_type]


# ---------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """GQA with per-head RMSNorm on q and k (before RoPE), no biases.

    With `cache` given (inference), the cache stores k/v and computes the attention itself
    (`cache.attend(layer_idx, q, k, v)`), so ring buffers and decode masks live in infer/, not here.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, layer_type: str):
        super().__init__()
        self.layer_idx, self.layer_type = layer_idx, layer_type
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.window_of(layer_type)
        D, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, D, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x_BTD, cos, sin, mask, cache=None):
        B, T, _ = x_BTD.shape
        d = self.head_dim
        q_BHTd = self.q_norm(self.q_proj(x_BTD).view(B, T, self.n_heads, d)).transpose(1, 2)
        k_BGTd = self.k_norm(self.k_proj(x_BTD).view(B, T, self.n_kv, d)).transpose(1, 2)
        v_BGTd = self.v_proj(x_BTD).view(B, T, self.n_kv, d).transpose(1, 2)
        q_BHTd, k_BGTd = apply_rope(q_BHTd, cos, sin), apply_rope(k_BGTd, cos, sin)
        if cache is not None:
            o_BHTd = cache.attend(self.layer_idx, q_BHTd, k_BGTd, v_BGTd)
        else:
            o_BHTd = F.scaled_dot_product_attention(
                q_BHTd, k_BGTd, v_BGTd, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(o_BHTd.transpose(1, 2).reshape(B, T, self.n_heads * d))
