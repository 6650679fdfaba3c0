"""The engine's forward passes over a KV cache: the model's own code (`Reference`) and a decode fast
path (`Fast`) that reuses the model's parameters with far fewer PyTorch ops per step.

Decoding `tiny` on a CPU is overhead-bound: a step reads ~20 MB of fp32 weights (~1 ms on one core)
but the generic `model.trunk` dispatches ~760 small ops. `Fast` needs ~450: q/k/v as one matmul with
the input norm's weight folded in, q-norm and k-norm as one norm over the concatenated heads, matmuls
on pre-transposed views with the residual add fused (addmm), RoPE gathered from a per-position table
the model's own Rotary computed, a 3-4 op RMSNorm, k/v written in place by the cache, and MoE paths
for a handful of tokens that run only the chosen experts (`moe_host` on a CPU, `moe_gather` without
host syncs for CUDA graphs). In bf16 on a CPU, one-row matmuls run on PyTorch's own BLAS kernels
instead of oneDNN's (see `_one_row_gemms`). Nothing in mellum2/model changes;
tests/test_infer_forward.py checks `Fast` against `Reference` (and so against `model(...)`).

Both expose the same calls, each one cache step:
  trunk(ids_BT, pos_BT, cache, valid_BT=None, hi=None) -> h_BTD (before the final norm)
  head(h_BTD) -> fp32 logits
  mtp(h_BTD, next_ids_BT, pos_BT, cache, hi=None, pick_B=None) -> y_BTD (the MTP layer's output, before
      mtp.norm); with pick_B only row b's position pick_B[b] comes out ([B, 1, D]): every position's
      k/v still enters the cache, but the MLP (MoE) runs for the picked one only
  mtp_head(y_BTD) -> fp32 logits of the MTP head (Fast: optionally over a draft vocabulary only)

The model runs in its parameter dtype (fp32 or bf16), no autocast. The fused q/k/v weights are copies
made at construction: `refresh()` re-reads the weights (the Engine does so whenever they changed).

Legend: B rows, T tokens, D model width, H/G query/kv heads, d head_dim, E experts, K top-k,
N = B*T tokens flattened, I expert width, V vocab.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mellum2.model.moe import MoE
from mellum2.model.transformer import Mellum2

from .kvcache import KVCache


MOE_IMPLS = ("auto", "host", "gather", "grouped", "dense", "bmm")


def _one_row_gemms(on: bool):
    """`_OneRowGemms` when `on`, else a no-op context (fp32 and multi-row steps pay nothing)."""
    return _OneRowGemms() if on and not torch.compiler.is_compiling() else _NO_OP


class _OneRowGemms:
    """While active (and `on`), CPU matmuls skip oneDNN and run on PyTorch's own BLAS kernels.

    Measured on this 2-core AVX-512 CPU, one thread, bf16 [1, in] @ [in, out]: oneDNN costs a floor of
    ~24 us a call whatever the size (7 us for a 256x128 weight without it; 22 vs 35 us at 256x512;
    381 vs 437 us for the 256x8192 LM head), while PyTorch's kernel costs grow with the rows (one dot
    product per output: at 2+ rows oneDNN wins). So a one-token step in bf16 runs with oneDNN off, and
    a step of more tokens turns it off around the per-expert matmuls of `moe_host` only (one row each).
    Same dtypes in and out, fp32 accumulation in both. oneDNN's switch is process-global: it is
    restored on exit (also on errors); fp32 never goes through oneDNN here (MKL sgemm), so fp32 is
    untouched. Inside a traced step it is a no-op: the engine sets it around the compiled call."""

    def __enter__(self):
        self.prev = torch._C._get_mkldnn_enabled()  # per use: nested uses (trunk, then moe_host) restore in turn
        torch._C._set_mkldnn_enabled(False)

    def __exit__(self, *exc):
        torch._C._set_mkldnn_enabled(self.prev)
        return False


_NO_OP = contextlib.nullcontext()


class Reference:
    """The model's own trunk/head/MTP code driven through the cache protocol (obviously correct)."""

    def __init__(self, model: Mellum2):
        self.model = model

    def trunk(self, ids_BT, pos_BT, cache: KVCache, valid_BT=None, hi=None):
        cache.begin(pos_BT, valid_BT, hi)
        return self.model.trunk(ids_BT, pos_BT, cache=cache)[0]

    def head(self, h_BTD):
        return self.model.head(h_BTD)

    def mtp(self, h_BTD, next_ids_BT, pos_BT, cache: KVCache, hi=None, pick_B=None):
        cache.begin(pos_BT, hi=hi, ring=False)
        y_BTD = self.model.mtp(self.model, h_BTD, next_ids_BT, pos_BT, cache=cache)[0]
        return y_BTD if pick_B is None else _pick(y_BTD, pick_B)

    def mtp_head(self, y_BTD):
        return self.model.mtp.logits(self.model, y_BTD)

    def refresh(self):
        pass


class _Layer:
    """One decoder layer's tensors, prepared for the fast path: matmul weights as [in, out] views
    (torch.mm without a transpose op per call), q/k/v fused with the input norm's weight folded in
    (rms_norm(x) * w @ W^T == rms_norm(x) @ (W * w)^T), per-expert views listed once."""

    def __init__(self, layer, cfg):
        a = layer.self_attn
        self.idx = a.layer_idx
        self.type = layer.layer_type
        w_in = layer.input_layernorm.weight
        self.w_qkvT = (torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) * w_in).detach().t()
        H, G, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # q-norm and k-norm weights side by side: one rms_norm over the H+G heads of a token
        self.w_qk = torch.cat([a.q_norm.weight.expand(H, d), a.k_norm.weight.expand(G, d)]).detach()
        self.w_oT = a.o_proj.weight.detach().t()
        self.w_post = layer.post_attention_layernorm.weight.detach()
        self.moe = isinstance(layer.mlp, MoE)
        m = layer.mlp
        if self.moe:
            self.w_routerT = m.gate.weight.detach().float().t()  # router in fp32 (precision policy)
            self.gate, self.up, self.down = m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj
            self.experts = m.experts
            self._down_cat = None  # moe_dense's [E*I, D] copy of down, made on first use
            self._bmm = None  # moe_bmm's contiguous [E, D, 2I] gate|up and [E, I, D] down, made on first use
            self.gT = [w.detach().t() for w in self.gate.unbind(0)]
            self.uT = [w.detach().t() for w in self.up.unbind(0)]
            self.dT = [w.detach().t() for w in self.down.unbind(0)]
        else:
            self.gT, self.uT, self.dT = (w.weight.detach().t() for w in (m.gate_proj, m.up_proj, m.down_proj))


class Fast:
    """Decode fast path over the model's parameters (see the module docstring)."""

    def __init__(self, model: Mellum2, moe: str = "auto"):
        if moe not in MOE_IMPLS:
            raise ValueError(f"Fast: moe must be one of {MOE_IMPLS}, got {moe!r}")
        self.model, self.cfg, self.moe_impl = model, model.cfg, moe
        self.eps = self.cfg.rms_norm_eps
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.refresh()

    def _rms(self, x, w=None):
        """RMSNorm over the last dim in 3-4 dispatches (F.rms_norm is a 5-op composite on the CPU):
        x * rsqrt(||x||^2 / D + eps), statistics in fp32 like the model's RMSNorm."""
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        r = torch.addcmul(self._eps_t, n, n, value=1.0 / x.shape[-1]).rsqrt_()
        y = x * (r if x.dtype == torch.float32 else r.to(x.dtype))
        return y if w is None else y.mul_(w)

    def refresh(self) -> None:
        """Re-read the model's weights (the fused q/k/v copies go stale when training changes them)."""
        m = self.model
        self.cfg = m.cfg
        with torch.no_grad():
            self.layers = [_Layer(layer, self.cfg) for layer in m.model.layers]
            self.mtp_layer = _Layer(m.mtp.layers[0], self.cfg) if m.mtp is not None else None
        self.dtype = m.lm_head.weight.dtype
        self._bf16_cpu = self.dtype == torch.bfloat16 and m.lm_head.weight.device.type == "cpu"
        self.w_headT = m.lm_head.weight.detach().t()
        # layer types whose rotary tables are identical share one gathered cos/sin per step
        tabs = m.rotary.tables
        self._rope_of = {}
        for lt in tabs:
            self._rope_of[lt] = next(o for o in tabs if torch.equal(tabs[o][0], tabs[lt][0])
                                     and tabs[o][1] == tabs[lt][1])
        self._eps_t = torch.tensor(self.eps, dtype=torch.float32, device=m.lm_head.weight.device)
        self._rope = {}
        self.set_draft_vocab(getattr(self, "draft_vocab", None))

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

    # ------------------------------------------------------------------ pieces (x_ND: N = B*T tokens)
    def _attn(self, L: _Layer, x_ND, B, T, cs, cache: KVCache):
        cfg = self.cfg
        H, G, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = torch.mm(self._rms(x_ND), L.w_qkvT).view(B, T, H + 2 * G, d)
        qk = self._rms(qkv[:, :, : H + G], L.w_qk)
        cos, sin = cs[L.type]
        x1, x2 = qk.chunk(2, dim=-1)
        qk = torch.addcmul(qk * cos, torch.cat((-x2, x1), dim=-1), sin)  # RoPE (rotate-half form, as the model)
        o_BHTd = cache.attend(L.idx, qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2),
                              qkv[:, :, H + G:].transpose(1, 2))
        return torch.addmm(x_ND, o_BHTd.transpose(1, 2).reshape(B * T, H * d), L.w_oT)  # + residual

    def _mlp(self, L: _Layer, x_ND):
        h_ND = self._rms(x_ND, L.w_post)
        if not L.moe:
            return torch.addmm(x_ND, F.silu(torch.mm(h_ND, L.gT)) * torch.mm(h_ND, L.uT), L.dT)
        logits_NE = torch.mm(h_ND.float(), L.w_routerT)
        if self.cfg.norm_topk_prob:  # renormalised top-k of a softmax = softmax of the top-k logits
            top_NK, ids_NK = logits_NE.topk(self.cfg.num_experts_per_tok, dim=-1)
            w_NK = top_NK.softmax(-1)
        else:
            w_NK, ids_NK = logits_NE.softmax(-1).topk(self.cfg.num_experts_per_tok, dim=-1)
        N = x_ND.shape[0]
        impl = self.moe_impl
        if impl == "auto" and torch.compiler.is_compiling():
            impl = "gather"  # traced into a compiled decode step: no host sync, static shapes
        elif impl == "auto":
            # measured on a trained tiny, batch-B decode steps (trunk + head, 1 thread, ms per step):
            # host vs grouped fp32 B=4 7.2/8.4, B=8 11.5/11.1, B=16 17.1/15.7; bf16 (one-row experts
            # without oneDNN) 8.1/11.8, 12.7/15.0, 17.1/17.5
            # dense (every expert on every token, moe_dense) for more rows in bf16 on a CPU, per MoE layer
            # (tiny, 1 thread, us): dense vs grouped N=16 537/1188, N=32 792/1378, N=64 1347/1559,
            # N=128 2439/1805; in fp32 dense loses (N=32 1541/1246: MKL's small fp32 GEMMs are cheap)
            # moe_bmm for more rows in fp32 on a CPU when experts are small (I x D <= 64k): a whole decode
            # step, batch 32 (ms, 1 thread, interleaved): tiny 32.0 vs grouped 36.5, moe64 38.1/43.5; with
            # 512 x 512 experts (wide128) it loses, 106/103 (MKL's grouped matmuls stream large weights well).
            # Prefill chunks too: tiny's 8 MoE layers, 128 / 256 / 512 / 1024 tokens, 20.0/30.4,
            # 26.2/36.7, 41.2/52.5, 81.3/84.9 ms
            few, dense_max, bmm_max = 8, 64, 1024
            cpu = x_ND.device.type == "cpu"
            if N <= few:
                impl = "host" if cpu else "gather"
            elif cpu and N <= dense_max and x_ND.dtype == torch.bfloat16:
                impl = "dense"
            elif cpu and N <= bmm_max and x_ND.dtype == torch.float32 and L.gate.shape[1] * L.gate.shape[2] <= 1 << 16:
                impl = "bmm"
            else:
                impl = "grouped"
        if impl == "host":
            return moe_host(L, h_ND, ids_NK, w_NK, x_ND)
        if impl == "gather":
            return x_ND + moe_gather(L, h_ND, ids_NK, w_NK)
        if impl == "dense":
            return moe_dense(L, h_ND, ids_NK, w_NK, x_ND)
        if impl == "bmm":
            y = moe_bmm(L, h_ND, ids_NK, w_NK, x_ND)
            if y is not None:
                return y
        return x_ND + L.experts(h_ND, ids_NK, w_NK)

    # ------------------------------------------------------------------ the three calls
    def trunk(self, ids_BT, pos_BT, cache: KVCache, valid_BT=None, hi=None):
        with _one_row_gemms(self._bf16_cpu and ids_BT.numel() == 1):
            return self._trunk(ids_BT, pos_BT, cache, valid_BT, hi)

    def _trunk(self, ids_BT, pos_BT, cache: KVCache, valid_BT=None, hi=None):
        cache.begin(pos_BT, valid_BT, hi)
        B, T = ids_BT.shape
        x = F.embedding(ids_BT.reshape(-1), self.model.model.embed_tokens.weight)
        shared = {o: self._cos_sin(pos_BT, o, cache.capacity) for o in {self._rope_of[t] for t in self.cfg.layer_types}}
        cs = {t: shared[self._rope_of[t]] for t in set(self.cfg.layer_types)}
        for L in self.layers:
            x = self._mlp(L, self._attn(L, x, B, T, cs, cache))
        return x.view(B, T, -1)

    def head(self, h_BTD):
        m = self.model
        with _one_row_gemms(self._bf16_cpu and h_BTD.numel() == h_BTD.shape[-1]):
            h_ND = self._rms(h_BTD.reshape(-1, h_BTD.shape[-1]), m.model.norm.weight)
            return torch.mm(h_ND, self.w_headT).float().view(*h_BTD.shape[:-1], -1)

    def mtp(self, h_BTD, next_ids_BT, pos_BT, cache: KVCache, hi=None, pick_B=None):
        with _one_row_gemms(self._bf16_cpu and next_ids_BT.numel() == 1):
            return self._mtp(h_BTD, next_ids_BT, pos_BT, cache, hi, pick_B)

    def _mtp(self, h_BTD, next_ids_BT, pos_BT, cache: KVCache, hi=None, pick_B=None):
        cache.begin(pos_BT, hi=hi, ring=False)
        m, mt, D = self.model, self.model.mtp, h_BTD.shape[-1]
        e = self._rms(F.embedding(next_ids_BT, m.model.embed_tokens.weight), mt.pre_fc_norm_embedding.weight)
        g = self._rms(h_BTD, mt.pre_fc_norm_hidden.weight)
        z = F.linear(torch.cat([e, g.to(e.dtype)], -1), mt.fc.weight)
        L = self.mtp_layer
        B, T = next_ids_BT.shape
        cs = {L.type: self._cos_sin(pos_BT, L.type, cache.capacity)}
        x_ND = self._attn(L, z.view(B * T, -1), B, T, cs, cache)
        if pick_B is not None:  # the MLP is per token: only the drafting position needs it
            return self._mlp(L, _pick(x_ND.view(B, T, -1), pick_B)[:, 0]).view(B, 1, -1)
        return self._mlp(L, x_ND).view(B, T, -1)

    def mtp_head(self, y_BTD, draft: bool = False):
        """The MTP head's logits; draft=True with a draft vocabulary set: over those ids only."""
        m = self.model
        w = self.w_draft if draft and self.w_draft is not None else m.lm_head.weight
        with _one_row_gemms(self._bf16_cpu and y_BTD.numel() == y_BTD.shape[-1]):
            y_ND = self._rms(y_BTD.reshape(-1, y_BTD.shape[-1]), m.mtp.norm.weight)
            return torch.mm(y_ND, w.t()).float().view(*y_BTD.shape[:-1], -1)

    def set_draft_vocab(self, ids) -> None:
        """Draft from these token ids only (FR-Spec, Zhao et al. 2025: the draft's LM head over the most
        frequent tokens costs a fraction of the full one; verification stays exact, a draft simply
        cannot propose a token outside the list). None: the full vocabulary."""
        w = self.model.lm_head.weight
        self.draft_vocab = None if ids is None else torch.as_tensor(ids, dtype=torch.long, device=w.device)
        self.w_draft = None if ids is None else w.detach().index_select(0, self.draft_vocab)


def _pick(x_BT_, idx_B):
    """x[b, idx[b]] for every row, keeping a length-1 T axis: [B, T, ...] -> [B, 1, ...]."""
    return x_BT_[torch.arange(x_BT_.shape[0], device=x_BT_.device), idx_B][:, None]


def moe_host(L: _Layer, h_ND, ids_NK, w_NK, res_ND):
    """res + SwiGLU experts, for a few tokens on the CPU: the chosen expert ids and weights go to the
    host (free on a CPU, where ops are synchronous anyway) and each chosen expert runs as plain
    matmuls on views of its weights: no sort, no counts, no weight copies, 5 ops per (token, expert)."""
    ids, ws = ids_NK.tolist(), w_NK.tolist()
    out = []
    with _one_row_gemms(h_ND.dtype == torch.bfloat16):
        for n in range(len(ids)):
            x_1D, y = h_ND[n:n + 1], res_ND[n:n + 1]
            for e, w in zip(ids[n], ws[n]):
                a = F.silu(torch.mm(x_1D, L.gT[e])).mul_(torch.mm(x_1D, L.uT[e]))
                y = torch.addmm(y, a, L.dT[e], alpha=w)  # y + w * (a @ down^T): the routing weight for free
            out.append(y)
    return out[0] if len(out) == 1 else torch.cat(out)


def moe_gather(L: _Layer, h_ND, ids_NK, w_NK):
    """SwiGLU experts for a few tokens, no host sync (capturable): each token's K chosen experts are
    gathered side by side into one [K*I, D] matrix, so a token's K experts are one matmul per kind
    (gate, up, down) instead of K: for token n, gate/up = x_n @ [W_e1; ..; W_eK]^T, and down sums
    the K experts' outputs as one matmul over the concatenated K*I inner dimension. Traced by
    torch.compile, the same sums take the form of `_moe_gather_traced`."""
    N, K = ids_NK.shape
    E, I, D = L.gate.shape
    if torch.compiler.is_compiling():
        return _moe_gather_traced(L, h_ND, ids_NK, w_NK)
    ids_S = ids_NK.reshape(-1)
    x_N1D = h_ND[:, None]
    g_N1J = torch.bmm(x_N1D, L.gate.index_select(0, ids_S).view(N, K * I, D).transpose(1, 2))  # J = K*I
    u_N1J = torch.bmm(x_N1D, L.up.index_select(0, ids_S).view(N, K * I, D).transpose(1, 2))
    a_NKI = (F.silu(g_N1J) * u_N1J).view(N, K, I) * w_NK.to(h_ND.dtype)[:, :, None]
    down_NDJ = L.down.index_select(0, ids_S).view(N, K, D, I).transpose(1, 2).reshape(N, D, K * I)
    return torch.bmm(a_NKI.view(N, 1, K * I), down_NDJ.transpose(1, 2))[:, 0]


def moe_dense(L: _Layer, h_ND, ids_NK, w_NK, res_ND):
    """res + SwiGLU experts for a small batch: every expert on every token, as three plain matmuls
    (gate and up over all E*I expert rows at once, down over the concatenated E*I inner dimension),
    with each token's routing weights scattered into [N, E] (zero where it did not choose the expert)
    scaling the activations before the down matmul, so the unchosen experts add exactly nothing.
    E/K times the arithmetic of the chosen experts alone, but no sort, no per-expert calls and full-width
    GEMMs: for a batch of decode rows that is faster than routing them (measured in `Fast._mlp`).
    Costs one copy of the down weights as [E*I, D] (gate and up are used as views)."""
    N = h_ND.shape[0]
    E, I, D = L.gate.shape
    if L._down_cat is None:  # _Layer is rebuilt when the weights (or their dtype) change
        L._down_cat = L.down.detach().to(h_ND.dtype).transpose(1, 2).reshape(E * I, D).contiguous()
    g_NJ = torch.mm(h_ND, L.gate.detach().view(E * I, D).t())  # J = E*I
    u_NJ = torch.mm(h_ND, L.up.detach().view(E * I, D).t())
    w_NE = torch.zeros(N, E, dtype=h_ND.dtype, device=h_ND.device).scatter_(1, ids_NK, w_NK.to(h_ND.dtype))
    a_NEI = (F.silu(g_NJ) * u_NJ).view(N, E, I) * w_NE[:, :, None]
    return torch.addmm(res_ND, a_NEI.view(N, E * I), L._down_cat)


def moe_bmm(L: _Layer, h_ND, ids_NK, w_NK, res_ND):
    """res + SwiGLU experts for a batch of decode rows on a CPU: the (token, expert) pairs sorted by
    expert into an [E, m, D] block (m = the busiest expert's count, the rest zero rows), then two
    batched matmuls over every expert at once, gate and up fused ([E, D, 2I]) and down ([E, I, D]),
    and the outputs weighted and added back per token. Against the grouped path's 3 x E small
    matmuls on transposed views: 2 calls on contiguous operands, each weight read once (at 32 rows
    all 16 experts of `tiny` are busy, and MKL's small-M matmuls on views cost ~3x their bytes).
    Costs a contiguous copy of the layer's experts (made on first use; the Engine rebuilds _Layer
    when the weights change). None when routing is so skewed that padding would more than double the
    rows (the caller falls back to the grouped path)."""
    N, K = ids_NK.shape
    E, I, D = L.gate.shape
    ids_S = ids_NK.reshape(-1)
    counts_E = torch.bincount(ids_S, minlength=E)
    m = int(counts_E.max())  # a host sync: free on a CPU, where every op is synchronous
    if E * m > 2 * N * K + E:
        return None
    if L._bmm is None:
        L._bmm = (torch.cat([L.gate, L.up], 1).detach().to(h_ND.dtype).transpose(1, 2).contiguous(),
                  L.down.detach().to(h_ND.dtype).transpose(1, 2).contiguous())
    gu_EDJ, d_EID = L._bmm  # J = 2I
    e_S, order_S = torch.sort(ids_S, stable=True)
    first_E = torch.cumsum(counts_E, 0) - counts_E
    row_S = e_S * m + (torch.arange(N * K, device=h_ND.device) - first_E[e_S])  # a pair's row in [E*m]
    tok_S = order_S // K
    x_RD = h_ND.new_zeros(E * m, D).index_copy_(0, row_S, h_ND.index_select(0, tok_S))
    g_EmI, u_EmI = torch.bmm(x_RD.view(E, m, D), gu_EDJ).split(I, -1)
    y_RD = torch.bmm(F.silu(g_EmI).mul_(u_EmI), d_EID).view(E * m, D)
    w_S = w_NK.reshape(-1).index_select(0, order_S).to(h_ND.dtype)
    return res_ND.index_add(0, tok_S, y_RD.index_select(0, row_S).mul_(w_S[:, None]))


def _moe_gather_traced(L: _Layer, h_ND, ids_NK, w_NK):
    """`moe_gather` as products reduced over each weight's contiguous last dimension, for inductor:
    it fuses the expert lookup into the reduction loops, which read the chosen experts' rows in place
    (no gathered copy, no matmul call) and accumulate in fp32. On this CPU the compiled `tiny` decode
    step went from 1.2x (fp32) / 1.4x (bf16) the eager step's speed with the index_select + bmm form
    (whose M=1 bmm inductor turns into a slow loop over gathered copies) to 1.55x / 1.65x. Eager, the products would
    be materialised ([N, K, I, D]); `moe_gather` keeps the matmul form there."""
    x_N11D = h_ND[:, None, None, :]
    g_NKI = (x_N11D * L.gate[ids_NK]).sum(-1)  # gate [E, I, D] -> [N, K, I, D], reduced over D
    u_NKI = (x_N11D * L.up[ids_NK]).sum(-1)
    a_NKI = F.silu(g_NKI) * u_NKI * w_NK.to(h_ND.dtype)[..., None]
    return (a_NKI[:, :, None, :] * L.down[ids_NK]).sum((1, 3))  # down [E, D, I] -> [N, K, D, I]
