"""The engine's forward passes over a KV cache: the model's own code (`Reference`) and a decode fast
path (`Fast`) that reuses the model's parameters with far fewer PyTorch ops per step.

Decoding a small model on a CPU is overhead-bound: a step of `tiny` reads ~30 MB of weights (~0.3 ms
at memory bandwidth) but dispatches ~600 small ops through the generic `model.trunk`. `Fast` cuts
that: one fused-weight q/k/v matmul, q-norm and k-norm as one `rms_norm` over the concatenated heads,
RoPE from a precomputed per-position table (one gather per step instead of cos/sin per forward), k/v
written in place by the cache, and a top-k MoE path for a handful of tokens that runs only the K
chosen experts (see `moe_host` and `moe_gather`). Nothing in mellum2/model changes; tests/test_infer_forward.py checks
`Fast` against `Reference` (and so against `model(...)`).

Both expose the same three calls, each one cache step:
  trunk(ids_BT, pos_BT, cache, valid_BT=None, hi=None) -> h_BTD (before the final norm)
  head(h_BTD) -> fp32 logits
  mtp(h_BTD, next_ids_BT, pos_BT, cache, hi=None) -> y_BTD (the MTP layer's output, before mtp.norm)

The model runs in its parameter dtype (fp32 or bf16), no autocast. The fused q/k/v weights are copies
made at construction: call `refresh()` after the model's weights change (RL), or use `Reference`.

Legend: B rows, T tokens, D model width, H/G query/kv heads, d head_dim, E experts, K top-k,
N = B*T tokens flattened, I expert width, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mellum2.model.moe import MoE
from mellum2.model.transformer import Mellum2

from .kvcache import KVCache


MOE_IMPLS = ("auto", "host", "gather", "grouped")


class Reference:
    """The model's own trunk/head/MTP code driven through the cache protocol (obviously correct)."""

    def __init__(self, model: Mellum2):
        self.model = model

    def trunk(self, ids_BT, pos_BT, cache: KVCache, valid_BT=None, hi=None):
        cache.begin(pos_BT, valid_BT, hi)
        return self.model.trunk(ids_BT, pos_BT, cache=cache)[0]

    def head(self, h_BTD):
        return self.model.head(h_BTD)

    def mtp(self, h_BTD, next_ids_BT, pos_BT, cache: KVCache, hi=None):
        cache.begin(pos_BT, hi=hi, ring=False)
        return self.model.mtp(self.model, h_BTD, next_ids_BT, pos_BT, cache=cache)[0]

    def mtp_head(self, y_BTD):
        return self.model.mtp.logits(self.model, y_BTD)

    def refresh(self):
        pass


class _Layer:
    """One decoder layer's tensors, prepared for the fast path."""

    def __init__(self, layer, cfg):
        a = layer.self_attn
        self.idx = a.layer_idx
        self.type = layer.layer_type
        self.w_in, self.w_post = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.w_qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
        H, G, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # q-norm and k-norm weights side by side: one rms_norm over the H+G heads of a token
        self.w_qk = torch.cat([a.q_norm.weight.expand(H, d), a.k_norm.weight.expand(G, d)]).detach()
        self.w_o = a.o_proj.weight
        self.moe = isinstance(layer.mlp, MoE)
        m = layer.mlp
        if self.moe:
            self.w_router = m.gate.weight
            self.gate, self.up, self.down = m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj
            self.experts = m.experts
        else:
            self.gate, self.up, self.down = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight


class Fast:
    """Decode fast path over the model's parameters (see the module docstring)."""

    def __init__(self, model: Mellum2, moe: str = "auto"):
        if moe not in MOE_IMPLS:
            raise ValueError(f"Fast: moe must be one of {MOE_IMPLS}, got {moe!r}")
        self.model, self.cfg, self.moe_impl = model, model.cfg, moe
        self.eps = self.cfg.rms_norm_eps
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the model's weights (the fused q/k/v copies go stale when training changes them)."""
        m = self.model
        with torch.no_grad():
            self.layers = [_Layer(layer, self.cfg) for layer in m.model.layers]
            self.mtp_layer = _Layer(m.mtp.layers[0], self.cfg) if m.mtp is not None else None
        self.dtype = m.lm_head.weight.dtype

    # ------------------------------------------------------------------ rope table
    def _cos_sin(self, pos_BT, layer_type, capacity):
        """cos/sin [B, T, 1, d] for the positions, gathered from a table the model's Rotary computed
        (for positions 0..capacity-1, grown by doubling; identical values to computing them per step)."""
        tab = self._rope.get(layer_type)
        if tab is None or tab[0].device != pos_BT.device or tab[0].shape[0] < capacity:
            need = max(capacity, 2 * tab[0].shape[0] if tab is not None else 0)
            with torch.no_grad():
                p = torch.arange(need, device=pos_BT.device)[None]
                cos, sin = self.model.rotary(p, layer_type, self.dtype)
            tab = self._rope[layer_type] = (cos[0], sin[0])
        B, T = pos_BT.shape
        p = pos_BT.reshape(-1)
        return tab[0].index_select(0, p).view(B, T, 1, -1), tab[1].index_select(0, p).view(B, T, 1, -1)

    # ------------------------------------------------------------------ pieces
    def _attn(self, L: _Layer, x_BTD, cs, cache: KVCache):
        B, T, _ = x_BTD.shape
        cfg = self.cfg
        H, G, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = F.linear(F.rms_norm(x_BTD, (x_BTD.shape[-1],), L.w_in, self.eps), L.w_qkv).view(B, T, H + 2 * G, d)
        qk = F.rms_norm(qkv[:, :, : H + G], (d,), None, self.eps) * L.w_qk
        cos, sin = cs[L.type]
        x1, x2 = qk.chunk(2, dim=-1)
        qk = qk * cos + torch.cat((-x2, x1), dim=-1) * sin  # RoPE (rotate-half form, as the model)
        o_BHTd = cache.attend(L.idx, qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2),
                              qkv[:, :, H + G:].transpose(1, 2))
        return x_BTD + F.linear(o_BHTd.transpose(1, 2).reshape(B, T, H * d), L.w_o)

    def _mlp(self, L: _Layer, x_BTD):
        B, T, D = x_BTD.shape
        h_ND = F.rms_norm(x_BTD, (D,), L.w_post, self.eps).view(B * T, D)
        if not L.moe:
            y_ND = F.linear(F.silu(F.linear(h_ND, L.gate)) * F.linear(h_ND, L.up), L.down)
        else:
            logits_NE = F.linear(h_ND.float(), L.w_router.float())
            if self.cfg.norm_topk_prob:  # renormalised top-k of a softmax = softmax of the top-k logits
                top_NK, ids_NK = logits_NE.topk(self.cfg.num_experts_per_tok, dim=-1)
                w_NK = top_NK.softmax(-1)
            else:
                w_NK, ids_NK = logits_NE.softmax(-1).topk(self.cfg.num_experts_per_tok, dim=-1)
            impl = self.moe_impl
            if impl == "auto":
                impl = ("host" if h_ND.device.type == "cpu" else "gather") if B * T <= 2 else "grouped"
            if impl == "host":
                y_ND = moe_host(L, h_ND, ids_NK, w_NK)
            elif impl == "gather":
                y_ND = moe_gather(L, h_ND, ids_NK, w_NK)
            else:
                y_ND = L.experts(h_ND, ids_NK, w_NK)
        return x_BTD + y_ND.view(B, T, D)

    # ------------------------------------------------------------------ the three calls
    def trunk(self, ids_BT, pos_BT, cache: KVCache, valid_BT=None, hi=None):
        cache.begin(pos_BT, valid_BT, hi)
        x = F.embedding(ids_BT, self.model.model.embed_tokens.weight)
        cs = {t: self._cos_sin(pos_BT, t, cache.capacity) for t in set(self.cfg.layer_types)}
        for L in self.layers:
            x = self._mlp(L, self._attn(L, x, cs, cache))
        return x

    def head(self, h_BTD):
        m = self.model
        return F.linear(F.rms_norm(h_BTD, (h_BTD.shape[-1],), m.model.norm.weight, self.eps), m.lm_head.weight).float()

    def mtp(self, h_BTD, next_ids_BT, pos_BT, cache: KVCache, hi=None):
        cache.begin(pos_BT, hi=hi, ring=False)
        m, mt, D = self.model, self.model.mtp, h_BTD.shape[-1]
        e = F.rms_norm(F.embedding(next_ids_BT, m.model.embed_tokens.weight), (D,), mt.pre_fc_norm_embedding.weight,
                       self.eps)
        g = F.rms_norm(h_BTD, (D,), mt.pre_fc_norm_hidden.weight, self.eps)
        z = F.linear(torch.cat([e, g.to(e.dtype)], -1), mt.fc.weight)
        L = self.mtp_layer
        return self._mlp(L, self._attn(L, z, {L.type: self._cos_sin(pos_BT, L.type, cache.capacity)}, cache))

    def mtp_head(self, y_BTD):
        m = self.model
        return F.linear(F.rms_norm(y_BTD, (y_BTD.shape[-1],), m.mtp.norm.weight, self.eps), m.lm_head.weight).float()


def moe_host(L: _Layer, h_ND, ids_NK, w_NK):
    """SwiGLU experts for a token or two on the CPU: the chosen expert ids go to the host (free on a
    CPU, where ops are synchronous anyway) and each chosen expert runs as plain matmuls on views of
    its weights: no sort, no counts, no copy of weights."""
    N, K = ids_NK.shape
    ids = ids_NK.tolist()
    out = []
    for n in range(N):
        x_1D = h_ND[n:n + 1]
        y = None
        for j, e in enumerate(ids[n]):
            h = F.silu(F.linear(x_1D, L.gate[e])) * F.linear(x_1D, L.up[e])
            y_e = F.linear(h * w_NK[n, j].to(h.dtype), L.down[e])
            y = y_e if y is None else y + y_e
        out.append(y)
    return out[0] if N == 1 else torch.cat(out)


def moe_gather(L: _Layer, h_ND, ids_NK, w_NK):
    """SwiGLU experts for a few tokens, no host sync (capturable): each token's K chosen experts are
    gathered side by side into one [K*I, D] matrix, so a token's K experts are one matmul per kind
    (gate, up, down) instead of K: for token n, gate/up = x_n @ [W_e1; ..; W_eK]^T, and down sums
    the K experts' outputs as one matmul over the concatenated K*I inner dimension."""
    N, K = ids_NK.shape
    E, I, D = L.gate.shape
    ids_S = ids_NK.reshape(-1)
    x_N1D = h_ND[:, None]
    g_N1J = torch.bmm(x_N1D, L.gate.index_select(0, ids_S).view(N, K * I, D).transpose(1, 2))  # J = K*I
    u_N1J = torch.bmm(x_N1D, L.up.index_select(0, ids_S).view(N, K * I, D).transpose(1, 2))
    a_NKI = (F.silu(g_N1J) * u_N1J).view(N, K, I) * w_NK.to(h_ND.dtype)[:, :, None]
    down_NDJ = L.down.index_select(0, ids_S).view(N, K, D, I).transpose(1, 2).reshape(N, D, K * I)
    return torch.bmm(a_NKI.view(N, 1, K * I), down_NDJ.transpose(1, 2))[:, 0]
