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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where it is on for x's device, else x's own."""
    dt = x.device.type
    return torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else x.dtype


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


def blocked_attention(q_BHTd, k_BGSd, v_BGSd, window: int | None, doc_BT=None, block: int = 512,
                      q_offset: int | None = None):
    """Causal (windowed, per-document) attention one query block at a time, so no T x T mask or score
    matrix ever exists: a block of C queries sees at most C + window keys on sliding layers (the
    long-context memory win) and C x S on full layers. Keys/values cover positions 0..S-1; queries
    are the last T of them (q_offset = S - T when a cache holds earlier keys)."""
    T, S = q_BHTd.shape[2], k_BGSd.shape[2]
    q_offset = S - T if q_offset is None else q_offset
    gqa = q_BHTd.shape[1] != k_BGSd.shape[1]
    outs = []
    for s in range(0, T, block):
        e = min(T, s + block)
        qs, qe = q_offset + s, q_offset + e  # absolute query positions
        ks = max(0, qs - window + 1) if window is not None else 0
        qi = torch.arange(qs, qe, device=q_BHTd.device)
        ki = torch.arange(ks, qe, device=q_BHTd.device)
        m_CK = ki[None, :] <= qi[:, None]
        if window is not None:
            m_CK = m_CK & (qi[:, None] - ki[None, :] < window)
        m = m_CK[None, None]
        if doc_BT is not None:
            m = m & (doc_BT[:, None, qs:qe, None] == doc_BT[:, None, None, ks:qe])
        outs.append(F.scaled_dot_product_attention(
            q_BHTd[:, :, s:e], k_BGSd[:, :, ks:qe], v_BGSd[:, :, ks:qe], attn_mask=m, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


class AttnPlan:
    """How one layer type attends in a cache-free forward: plain causal (SDPA's flash path), a dense
    boolean mask (short sequences), or query blocks (long sequences: no T x T tensor)."""

    __slots__ = ("kind", "mask", "window", "doc", "block")

    def __init__(self, kind, mask=None, window=None, doc=None, block=512):
        self.kind, self.mask, self.window, self.doc, self.block = kind, mask, window, doc, block


def attend(q_BHTd, k_BGTd, v_BGTd, plan: AttnPlan | None, kernel=None):
    """Cache-free attention by the plan: SDPA (the reference), or an installed `kernel` (see
    Attention) where it applies: kernel(q, k, v, causal mask or None, window) returns None where not."""
    gqa = q_BHTd.shape[1] != k_BGTd.shape[1]
    if kernel is not None and (plan is None or plan.kind in ("causal", "dense")):
        mask, window = (plan.mask, plan.window) if plan is not None else (None, None)  # plan masks are causal
        o_BHTd = kernel(q_BHTd, k_BGTd, v_BGTd, mask, window)
        if o_BHTd is not None:
            return o_BHTd
    if plan is None or plan.kind == "causal":
        return F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, is_causal=True, enable_gqa=gqa)
    if plan.kind == "dense":
        return F.scaled_dot_product_attention(q_BHTd, k_BGTd, v_BGTd, attn_mask=plan.mask, enable_gqa=gqa)
    return blocked_attention(q_BHTd, k_BGTd, v_BGTd, plan.window, plan.doc, plan.block, q_offset=0)


class MaskCache:
    """Plans each layer type's attention once per forward pass (layers of a type share it).

    Sequences up to `dense_max` tokens use one boolean mask (fastest at short lengths); longer ones
    with a window or packed documents go block by block, so memory grows linearly in T."""

    dense_max = 2048

    def __init__(self, cfg: ModelConfig, T: int, doc_ids_BT: torch.Tensor | None, device):
        self.cfg, self.T, self.doc, self.device = cfg, T, doc_ids_BT, device
        self._p: dict[str, AttnPlan] = {}

    def get(self, layer_type: str) -> AttnPlan:
        if layer_type not in self._p:
            w = self.cfg.window_of(layer_type)
            if w is not None and w >= self.T:
                w = None
            if w is None and self.doc is None:
                plan = AttnPlan("causal")
            elif self.T <= self.dense_max:
                plan = AttnPlan("dense", mask=attn_mask(self.T, w, self.doc, self.device), window=w)
            else:
                plan = AttnPlan("blocked", window=w, doc=self.doc, block=min(512, w or 512))
            self._p[layer_type] = plan
        return self._p[layer_type]


# ---------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """GQA with per-head RMSNorm on q and k (before RoPE), no biases.

    With `cache` given (inference), the cache stores k/v and computes the attention itself
    (`cache.attend(layer_idx, q, k, v)`), so ring buffers and decode masks live in infer/, not here.

    Two slots for fast paths, set by `mellum2.kernels.install` (as built: the reference paths):
    `kernel`, a cache-free attention kernel tried before SDPA (kernels/cpu_attention.py), and
    `fuse_qkv`, q, k and v from one matmul in training (`_qkv`).
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
        self.kernel = None
        self.fuse_qkv = False

    def _plain_projections(self) -> bool:
        # FP8 swaps in Float8Linear (train/fp8.py): those keep their own matmuls
        return all(type(m) is nn.Linear for m in (self.q_proj, self.k_proj, self.v_proj))

    def _qkv(self, x_BTD):
        """q, k, v projections as one GEMM with the weights concatenated ([H d + 2 G d, D]): in
        training one wider matmul, one weight-gradient matmul and one input-gradient matmul instead
        of three each. The three stay separate parameters (checkpoint layout, Muon per matrix)."""
        dt = compute_dtype(x_BTD)
        w_FD = torch.cat([self.q_proj.weight.to(dt), self.k_proj.weight.to(dt), self.v_proj.weight.to(dt)])
        F_q, F_kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        return F.linear(x_BTD.to(dt), w_FD).split([F_q, F_kv, F_kv], dim=-1)

    def forward(self, x_BTD, cos, sin, plan: AttnPlan | None, cache=None):
        B, T, _ = x_BTD.shape
        d = self.head_dim
        if cache is None and self.fuse_qkv and torch.is_grad_enabled() and self._plain_projections():
            q_BTF, k_BTF, v_BTF = self._qkv(x_BTD)
        else:
            q_BTF, k_BTF, v_BTF = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        q_BHTd = self.q_norm(q_BTF.view(B, T, self.n_heads, d)).transpose(1, 2)
        k_BGTd = self.k_norm(k_BTF.view(B, T, self.n_kv, d)).transpose(1, 2)
        v_BGTd = v_BTF.view(B, T, self.n_kv, d).transpose(1, 2)
        q_BHTd, k_BGTd = apply_rope(q_BHTd, cos, sin), apply_rope(k_BGTd, cos, sin)
        if cache is not None:
            o_BHTd = cache.attend(self.layer_idx, q_BHTd, k_BGTd, v_BGTd)
        else:
            o_BHTd = attend(q_BHTd, k_BGTd, v_BGTd, plan, self.kernel)
        return self.o_proj(o_BHTd.transpose(1, 2).reshape(B, T, self.n_heads * d))
