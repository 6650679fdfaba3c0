"""The LM head and its cross-entropy in one pass over token chunks, for training.

`shifted_ce(head(x))` materialises the logits [tokens, vocab] in fp32: the matmul's output, its
fp32 copy, the log-softmax, and in backward their gradients of the same size (at `tiny`'s 8 x 512
tokens and 8k vocabulary, ~134 MB each, a tenth of a CPU training step). `linear_ce` instead walks
the tokens in chunks: logits of a chunk in the compute dtype (bf16 under autocast, as the head's
matmul would give them), loss and d loss / d logits in fp32 (`ce_chunk`, compiled for large chunks,
kernels/compiled.py), and the gradients of the head's input and weight right away; backward only
scales them by the incoming gradient (the approach of Liger-Kernel's fused linear cross-entropy).
Same numerics as the logits path: the logits are rounded to the compute dtype before the fp32
softmax in both, and the logits' gradient is rounded to it before the matmuls in both
(tests/test_head_loss.py compares losses and gradients).

No logits come back: the model uses it when asked for the loss without logits
(`Mellum2.forward(..., return_logits=False)`, which the trainers pass).
"""
from __future__ import annotations

import torch
from torch import Tensor

from mellum2.kernels.compiled import CompiledOrEager

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (8M: 16 MB in bf16); rows = this // vocab


def ce_chunk(logits_NV: Tensor, tgt_N: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of CE over rows whose target is not -100, and its gradient w.r.t. the logits (in the
    logits' dtype; 0 on ignored rows). Softmax in fp32. Written for inductor, which fuses it into
    one kernel (with a scatter for the one-hot, the eager idiom, 18-22 ms for 1024 x 8192 at 2
    threads: inductor does not fuse the scatter). The per-element work is kept cheap: one multiply
    by the row's 1 / sum (valid rows; 0 on ignored ones) instead of a division, and the one-hot as
    an int32 comparison (int64 lanes take 4 vector registers per 16 floats): 4.9 vs 6.4 ms."""
    x_NV = logits_NV.float()
    max_N1 = x_NV.amax(-1, keepdim=True)
    e_NV = torch.exp(x_NV - max_N1)
    sum_N1 = e_NV.sum(-1, keepdim=True)
    valid_N1 = (tgt_N != -100).unsqueeze(1)
    t_N1 = tgt_N.clamp(min=0).unsqueeze(1)
    lse_N1 = max_N1 + sum_N1.log()
    loss = ((lse_N1 - x_NV.gather(1, t_N1)) * valid_N1).sum()
    hit_NV = (torch.arange(x_NV.shape[1], device=x_NV.device, dtype=torch.int32) == t_N1.int()) & valid_N1
    grad_NV = e_NV * (valid_N1 / sum_N1) - hit_NV.float()
    return loss, grad_NV.to(logits_NV.dtype)


_compiled_chunk = CompiledOrEager(ce_chunk, "the LM head's cross-entropy")
_COMPILE_FROM = 1 << 22  # logits per chunk from which ce_chunk runs compiled (smaller: eager)


class _LinearCE(torch.autograd.Function):
    """loss_sum = sum_n CE(x_n W^T, t_n); gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, x_ND, w_VD, tgt_N, dtype, rows, chunk_fn):
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(x_ND.device.type, enabled=False):
            w = w_VD.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=x_ND.device)
            gx_ND = torch.empty_like(x_ND) if want_x else None
            gw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_w else None
            for s in range(0, x_ND.shape[0], rows):
                x = x_ND[s:s + rows].to(dtype)
                loss_c, g_NV = chunk_fn(x @ w.T, tgt_N[s:s + rows])
                loss = loss + loss_c
                if want_x:
                    gx_ND[s:s + rows] = g_NV @ w
                if want_w:  # fp32 += bf16 in place: no fp32 copy of the product (same sums, bit for bit)
                    gw_VD.add_(g_NV.T @ x)
        ctx.save_for_backward(gx_ND if want_x else None, gw_VD.to(w_VD.dtype) if want_w else None)
        return loss

    @staticmethod
    def backward(ctx, g):
        gx_ND, gw_VD = ctx.saved_tensors
        return (None if gx_ND is None else gx_ND * g.to(gx_ND.dtype),
                None if gw_VD is None else gw_VD * g.to(gw_VD.dtype), None, None, None, None)


def linear_ce(x_BTD: Tensor, weight_VD: Tensor, labels_BT: Tensor, shift: int,
              chunk_elements: int = CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Mean CE of (x W^T)[:, t] against labels[:, t + shift] over labels != -100 (0 if none), and
    the number of those labels: `shifted_ce(x @ W.T, labels, shift)` without the logits.
    x_BTD is the normed hidden state; W the LM head's weight [vocab, D]."""
    D = x_BTD.shape[-1]
    T_pred = labels_BT.shape[1] - shift
    dev = x_BTD.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_BTD.dtype
    x_ND = x_BTD[:, :T_pred].reshape(-1, D)
    tgt_N = labels_BT[:, shift:shift + T_pred].reshape(-1)
    n = (tgt_N != -100).sum()
    rows = max(1, chunk_elements // weight_VD.shape[0])
    chunk_fn = _compiled_chunk if min(rows, x_ND.shape[0]) * weight_VD.shape[0] >= _COMPILE_FROM else ce_chunk
    loss_sum = _LinearCE.apply(x_ND, weight_VD, tgt_N, dtype, rows, chunk_fn)
    return loss_sum / n.clamp(min=1), n
