"""Mixture of Experts: fp32 softmax router, top-k, dropless sorted dispatch through grouped_mm.

Follows transformers' Mellum (Qwen3-MoE) routing: logits = x @ W_r^T, softmax over all experts in
fp32, take top-k, renormalise when `norm_topk_prob`. Experts are SwiGLU; each expert's gate, up and
down matrices are stored as one 3-D tensor per kind ([E, I, D], [E, I, D], [E, D, I]) so Muon can
orthogonalise every expert's matrix separately and the released per-expert layout maps 1:1.

Two expert paths that must agree (tests/test_moe.py): `grouped` (sort token-slots by expert, one
`torch.nn.functional.grouped_mm` for gate and up together when training (one each without
autograd, which spares copying both weight stacks) and one for down, no capacity, no dropping)
and `loop` (the obvious per-expert reference). On the CPU in bf16 the grouped path rounds
every expert's group up to a multiple of a few rows (`Experts.pad_of`): oneDNN compiles a kernel per
new GEMM shape, and a training step's routing is new every step.

Legend: T tokens, D model width, E experts, K top-k, I expert width, S = T*K routed slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import compute_dtype


class Router(nn.Module):
    """Bias-free linear router; everything after the input is fp32 (precision policy)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def forward(self, x_TD: torch.Tensor):
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            probs_TE = logits_TE.softmax(dim=-1)
            w_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
            if self.norm_topk:
                w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        return logits_TE, probs_TE, w_TK, ids_TK


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = E
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.impl = "grouped"  # or "loop" (the reference)
        # the grouped matmul (x_SK, w_EKN, offs_E) -> y_SN: mellum2.kernels.install swaps in the CPU one
        # (kernels/cpu_experts.py), train/fp8.py an FP8 version
        self.gmm = F.grouped_mm
        self.max_pad = 64  # see pad_of
        # the [gate; up] stack in the compute dtype, reused while neither weight changed (see gate_up);
        # train/parallel.py turns it off under FSDP, whose unsharded weights are transient
        self.cache_gate_up = True
        self._gate_up_key, self._gate_up = None, None

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        return (self.grouped if self.impl == "grouped" else self.loop)(x_TD, ids_TK, w_TK)

    def grouped(self, x_TD, ids_TK, w_TK):
        T, K = ids_TK.shape
        D = x_TD.shape[1]
        dt = compute_dtype(x_TD)
        ids_S = ids_TK.reshape(-1)  # slot s = t * K + k
        pad = self.pad_of(x_TD.device, dt, ids_S.numel())
        rows, offs_E, dest_S = group_layout(ids_S, self.num_experts, pad)
        # one gather builds the expert-grouped input: row r holds the token of the slot placed there,
        # or the appended zero row (index T) for padding
        slot_R = torch.full((rows,), T * K, dtype=torch.long, device=x_TD.device)
        slot_R[dest_S] = torch.arange(T * K, device=x_TD.device)
        x_RD = _Dispatch.apply(x_TD.to(dt), slot_R // K, dest_S, K)
        if torch.is_grad_enabled() and (self.gate_proj.requires_grad or self.up_proj.requires_grad):
            # training: gate and up in one grouped matmul (each expert's [D, 2I]): a wider GEMM and one
            # gradient matmul for x in backward (bf16 tiny, experts fwd+bwd: 36 -> 26 ms). The two stay
            # separate parameters (Muon orthogonalises each matrix; the released layout keeps them apart).
            gu_ED2I = self.gate_up(dt)
            g_RI, u_RI = self.gmm(x_RD, gu_ED2I, offs=offs_E).chunk(2, dim=-1)
        else:  # inference (a prefill): no copy of the weights for the concatenation, two matmuls
            g_RI = self.gmm(x_RD, self.gate_proj.to(dt).transpose(1, 2), offs=offs_E)
            u_RI = self.gmm(x_RD, self.up_proj.to(dt).transpose(1, 2), offs=offs_E)
        y_RD = self.gmm(F.silu(g_RI) * u_RI, self.down_proj.to(dt).transpose(1, 2), offs=offs_E)
        y_TKD = _Combine.apply(y_RD, dest_S, slot_R).view(T, K, D)  # back to slot order
        return (y_TKD * w_TK.to(dt)[..., None]).sum(1)

    def gate_up(self, dt) -> torch.Tensor:
        """[gate; up] as one [E, D, 2I] operand in `dt` (a transposed view of [E, 2I, D]) whose gradient
        flows back to both parameters. One copy casts and concatenates (not a cast, then a
        concatenation: two passes), and the copy is kept while neither weight's version changes: the
        micro-batches of a step (gradient accumulation) and activation checkpointing's recomputed
        forward reuse it; the optimiser's in-place update invalidates it. The price is the bf16 copy
        held between steps (what the forward holds for backward anyway). Compiled, inductor fuses the
        plain expression itself."""
        if torch.compiler.is_compiling():
            return torch.cat([self.gate_proj.to(dt), self.up_proj.to(dt)], 1).transpose(1, 2)
        g, u = self.gate_proj, self.up_proj
        key = (dt, g.data_ptr(), u.data_ptr(), g._version, u._version)
        if self.cache_gate_up and self._gate_up_key == key:
            buf_E2ID = self._gate_up
        else:
            I = g.shape[1]
            with torch.no_grad():
                buf_E2ID = torch.empty(g.shape[0], 2 * I, g.shape[2], dtype=dt, device=g.device)
                buf_E2ID[:, :I].copy_(g)
                buf_E2ID[:, I:].copy_(u)
            self._gate_up_key, self._gate_up = (key, buf_E2ID) if self.cache_gate_up else (None, None)
        return _GateUp.apply(g, u, buf_E2ID)

    def pad_of(self, device, dt, S: int) -> int:
        """Rows per expert group are rounded up to a multiple of this (1: no padding). On the CPU,
        oneDNN compiles a new bf16 GEMM kernel for every new row count (~1.6 ms each here); routing
        changes every training step, so without padding a `tiny` step spent ~1.5 s compiling ~1,000
        kernels. With counts rounded to multiples of `pad` the shapes recur and the kernels are
        cached. The padding is at most E * (pad - 1) rows, kept under 1/8 of the S slots. fp32
        (MKL, nothing compiled per shape), GPUs and the FP8 matmul (whose scales must not see the
        unwritten rows past the last group) do not pad."""
        if device.type != "cpu" or dt not in (torch.bfloat16, torch.float16) or not _pads(self.gmm):
            return 1
        pad = 1
        while pad < self.max_pad and self.num_experts * (2 * pad - 1) * 8 <= S:
            pad *= 2
        return pad

    def loop(self, x_TD, ids_TK, w_TK):
        dt = compute_dtype(x_TD)
        x_TD = x_TD.to(dt)
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            tok, slot = torch.where(ids_TK == e)
            if tok.numel() == 0:
                continue
            h = F.silu(x_TD[tok] @ self.gate_proj[e].to(dt).T) * (x_TD[tok] @ self.up_proj[e].to(dt).T)
            y = (h @ self.down_proj[e].to(dt).T) * w_TK[tok, slot, None].to(dt)
            out_TD = out_TD.index_add(0, tok, y)
        return out_TD


def _pads(gmm) -> bool:
    """The grouped matmuls that run oneDNN per group, so pad_of's rounding keeps their shapes recurring:
    torch's, and those that say so (`per_group_gemms`, kernels/cpu_experts.py)."""
    return gmm is F.grouped_mm or getattr(gmm, "per_group_gemms", False)


class _GateUp(torch.autograd.Function):
    """Forward: the prepared [gate; up] stack buf_E2ID, transposed to [E, D, 2I]. Backward: the
    gradient split back into gate's and up's halves in their own dtypes (the cast's gradient)."""

    @staticmethod
    def forward(ctx, gate_EID, up_EID, buf_E2ID):
        ctx.I, ctx.dtypes = gate_EID.shape[1], (gate_EID.dtype, up_EID.dtype)
        return buf_E2ID.transpose(1, 2)

    @staticmethod
    def backward(ctx, g_ED2I):
        g_E2ID = g_ED2I.transpose(1, 2)
        return g_E2ID[:, :ctx.I].to(ctx.dtypes[0]), g_E2ID[:, ctx.I:].to(ctx.dtypes[1]), None


class _Dispatch(torch.autograd.Function):
    """x_RD = [x_TD; 0].index_select(0, src_R), whose gradient is a gather and a sum over the K slots
    of each token (the row of slot t*K+k is dest_S) instead of autograd's index_add: on the CPU
    that is a serial scatter_add (~1 ms a `tiny` layer), the gather ~0.2 ms."""

    @staticmethod
    def forward(ctx, x_TD, src_R, dest_S, K: int):
        ctx.save_for_backward(dest_S)
        ctx.K = K
        return torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])]).index_select(0, src_R)

    @staticmethod
    def backward(ctx, g_RD):
        (dest_S,) = ctx.saved_tensors
        g_TKD = g_RD.index_select(0, dest_S).view(-1, ctx.K, g_RD.shape[1])
        return g_TKD.sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """y_SD = y_RD.index_select(0, dest_S). dest_S is injective (each row holds at most one slot),
    so the gradient is a gather too: row r takes slot slot_R[r]'s gradient, padding rows
    (slot_R = S) a zero row."""

    @staticmethod
    def forward(ctx, y_RD, dest_S, slot_R):
        ctx.save_for_backward(slot_R)
        return y_RD.index_select(0, dest_S)

    @staticmethod
    def backward(ctx, g_SD):
        (slot_R,) = ctx.saved_tensors
        return torch.cat([g_SD, g_SD.new_zeros(1, g_SD.shape[1])]).index_select(0, slot_R), None, None


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many routed slots each expert got ([E], int64). Not `torch.bincount`: its output size
    depends on the data, which breaks a compiled graph (every MoE layer became two graphs, with the
    guards, autograd wrappers and lost fusion of a break each); a scatter-add has a static shape."""
    ids = ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def group_layout(ids_S: torch.Tensor, num_experts: int, pad: int = 1):
    """Where each routed slot goes in the expert-grouped buffer of grouped_mm.

    Returns (rows, offs_E, dest_S): the buffer's row count, the int32 end offset of each expert's
    group (grouped_mm's `offs`), and the row of every slot (slots in their original t * K + k order).
    Slots of one expert are contiguous, in slot order (a stable sort). With pad > 1 each group's
    length is rounded up to a multiple of `pad` (the extra rows read the zero row); rows is then the
    fixed bound S + E * (pad - 1), and the rows past the last group belong to no group (grouped_mm
    leaves them unwritten, and nothing reads them back)."""
    S = ids_S.numel()
    order_S = ids_S.argsort(stable=True)  # slots sorted by expert
    counts_E = expert_counts(ids_S, num_experts)
    if pad == 1:
        dest_S = torch.empty_like(order_S).index_copy_(0, order_S, torch.arange(S, device=ids_S.device))
        return S, counts_E.cumsum(0).to(torch.int32), dest_S
    size_E = (counts_E + pad - 1) // pad * pad
    end_E = size_E.cumsum(0)
    # a sorted slot's row = its group's padded start + its rank inside the group
    e_sorted = ids_S.index_select(0, order_S)
    rank = torch.arange(S, device=ids_S.device) - (counts_E.cumsum(0) - counts_E).index_select(0, e_sorted)
    rows_sorted = (end_E - size_E).index_select(0, e_sorted) + rank
    dest_S = torch.empty_like(order_S).index_copy_(0, order_S, rows_sorted)
    return S + num_experts * (pad - 1), end_E.to(torch.int32), dest_S


class MoE(nn.Module):
    """Sparse MLP block. Returns the output and the router's fp32 logits/probs/choices for the losses."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)

    def forward(self, x_BTD: torch.Tensor):
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)  # T below is B*T flattened tokens
        logits_TE, probs_TE, w_TK, ids_TK = self.gate(x_TD)
        y_TD = self.experts(x_TD, ids_TK, w_TK)
        return y_TD.view(B, T, D), RouterOut(logits_TE, probs_TE, ids_TK)


class RouterOut:
    """What the losses and load statistics need from one MoE layer (all fp32, [T, E] / [T, K])."""

    __slots__ = ("logits", "probs", "ids")

    def __init__(self, logits, probs, ids):
        self.logits, self.probs, self.ids = logits, probs, ids


class DenseMLP(nn.Module):
    """SwiGLU MLP for 'dense' layers (transformers' MellumMLP naming)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x_BTD):
        return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD)), None
