"""Training attention on the CPU: SDPA's flash forward, a backward made of batched matmuls.

On the 2-core AVX-512 CPU this project is built on, `F.scaled_dot_product_attention`'s CPU flash
kernel is fast forward (bf16, `tiny`'s batch 8 x 512, 4 heads over 2 kv heads: ~4 ms a layer) but
its backward is not (~25 ms, 6x the forward): in the compiled bf16 `tiny` training step it was the
largest single cost (~23% of forward + backward). `attention` keeps the flash forward (which also
returns each row's log-sum-exp) and computes the backward from the saved inputs as the textbook
flash-attention gradient, one block of at most `block_rows` query rows at a time, so the score
block held is [block_rows, S] per kv head, not [H*T, S] (FlashAttention-2, Dao 2023, Algorithm 2,
with blocks of rows instead of tiles):

    S = q k^T * scale            P = exp(S - lse)            (masked entries: P = 0)
    dV = P^T dO                  dP = dO V^T                 dS = P * (dP - rowsum(dO * O))
    dQ = dS k * scale            dK = dS^T q * scale

The matmuls run in the input dtype with fp32 accumulation (oneDNN in bf16) and return that dtype (so
S is rounded to bf16 before the exp, as in an eager bf16 attention); P is formed in fp32 and rounded
to the input dtype for the matmuls, dS formed in fp32 from that rounded P (so no fp32 copy of P is
kept between the matmuls) and rounded likewise; dK and dV accumulate in fp32 across blocks.
GQA: the r = H/G query heads of a kv head are stacked along the rows, query-major ([B, G, T*r, d]),
so each kv head's gradient is one matmul over all its query heads, and a block of rows is a range of
query positions: a causal block skips the keys after its last query and, given the window, the keys
before its first query's window (at T = 512, window 256, blocks of 128 queries: 3/8 of the scores
of the full layers and 7/16 of the sliding ones are never formed).

`training_attention` is what `mellum2.kernels.install` gives each `Attention` module (its `kernel`):
the model's cache-free forward uses it on a CPU in bf16 when gradients are needed (training); fp32,
inference and GPUs keep plain SDPA, the reference. The backward is compiled (inductor fuses its
elementwise passes) for sequences of useful size. Forward + backward of one layer at the sizes
above (bf16, 2 threads, ms): sliding 17.7 vs SDPA's 24.8, full 18.1 vs 26.6 (17.1 and 16.7 when the
caller is compiled too). The price: inductor compiles each new shape's backward once (here ~100 s
in all for a `tiny` run with MTP and packed documents on an empty inductor cache, seconds once
cached on disk); `install(model, attention="sdpa")` or MELLUM2_CPU_ATTENTION=sdpa keeps SDPA's backward
(short runs, no C++ compiler).
tests/test_cpu_attention.py checks values and gradients against SDPA (and the bf16 error against SDPA's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .compiled import CompiledOrEager

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def applies(q: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `attention` is the faster path for q attending in `dtype`: on a CPU, bf16, when a
    gradient is needed (training). In fp32 SDPA's own backward is the faster one (measured 43 vs 60 ms
    for the sizes above)."""
    return q.device.type == "cpu" and dtype == torch.bfloat16 and q.requires_grad and torch.is_grad_enabled()


def training_attention(q_BHTd, k_BGTd, v_BGTd, mask=None, window: int | None = None):
    """`Attention.kernel`: causal attention (mask: the model's causal plan mask, or None) through
    `attention` in the compute dtype where `applies`; None elsewhere, and the model runs SDPA."""
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q_BHTd.dtype
    if not applies(q_BHTd, dt):
        return None
    q, k, v = (x.to(dt) for x in (q_BHTd, k_BGTd, v_BGTd))
    return attention(q, k, v, mask, is_causal=True, window=window)


def attention(q_BHTd, k_BGTd, v_BGTd, mask=None, is_causal: bool = False, window: int | None = None,
              block_rows: int = 256):
    """Attention of H query heads over G kv heads (H % G == 0) like F.scaled_dot_product_attention
    with enable_gqa; mask: boolean, True = attend, broadcastable to [B, 1, T, S].

    is_causal without a mask: causal attention (top-left aligned, as SDPA). With a mask, is_causal and
    window are promises about it (it hides keys after the query; and those `window` or more positions
    before it), which let the backward skip the key ranges no query of a block can see."""
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"cpu_attention: the mask must be boolean, got {mask.dtype}")
    if window is not None and window < 1:
        raise ValueError(f"cpu_attention: window must be >= 1, got {window}")
    return _Attention.apply(q_BHTd, k_BGTd, v_BGTd, mask, is_causal, window, block_rows)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, window, block_rows):
        add = None
        if mask is not None:  # the flash kernel takes an additive mask in the query dtype
            add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        o, lse = _FLASH_CPU(q, k, v, 0.0, is_causal and mask is None, attn_mask=add)[:2]
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.is_causal, ctx.window, ctx.block_rows = is_causal, window, block_rows
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        B, H, T, d = q.shape
        G, S = k.shape[1], k.shape[2]
        r = H // G

        def rows(x):  # [B, H, T, ...] -> [B, G, T*r, ...]: a kv head's r query heads, query-major
            return x.reshape(B, G, r, T, -1).transpose(2, 3).reshape(B, G, T * r, x.shape[-1] if x.dim() == 4 else 1)

        q_r, do_r = rows(q), rows(do.to(q.dtype))
        lse_r, delta_r = rows(lse), rows((do.float() * o.float()).sum(-1))
        args = (q_r, k, v, do_r, lse_r, delta_r, mask, ctx.is_causal, ctx.window, r, ctx.block_rows)
        # compiled (inductor fuses the fp32 passes: 22 vs 43 ms eager at the docstring's sizes) when large
        dq, dk, dv = (_compiled_backward if B * H * T * S >= _COMPILE_FROM else _backward)(*args)
        return dq.reshape(B, G, T, r, d).transpose(2, 3).reshape(B, H, T, d), dk, dv, None, None, None, None


_COMPILE_FROM = 1 << 20  # score entries from which the eager backward runs compiled (fused elementwise)


def _backward(q_r, k, v, do_r, lse_r, delta_r, mask, is_causal: bool, window, r: int, block_rows: int):
    """dq [B, G, T*r, d], dk, dv [B, G, S, d] from query-major stacked rows (row j: query j // r)."""
    B, G, R, d = q_r.shape
    S, T = k.shape[2], R // r
    scale, dt = d ** -0.5, q_r.dtype
    if mask is not None:  # [b, 1, T, S] (or [T, S])
        m = mask.expand(*mask.shape[:-2], T, S)
        m = m.reshape(m.shape[0], 1, T, S) if m.dim() == 4 else m.reshape(1, 1, T, S)
    dqs, dks, dvs = [], [], []
    C = max(r, block_rows // r * r)  # whole queries per block
    blocked = R % C == 0
    if blocked:  # the blocks of q and dO laid out one after the other: each block a contiguous
        # [B, G, C, d] for the matmuls, where slices of [B, G, R, d] made every matmul copy its operand
        # (four copies a block; one fused copy of each tensor instead)
        q_blk = q_r.reshape(B, G, R // C, C, d).permute(2, 0, 1, 3, 4).contiguous()
        do_blk = do_r.reshape(B, G, R // C, C, d).permute(2, 0, 1, 3, 4).contiguous()
    for a in range(0, R, C):
        e = min(a + C, R)
        q_a, do_a = (q_blk[a // C], do_blk[a // C]) if blocked else (q_r[:, :, a:e], do_r[:, :, a:e])
        t_lo, t_hi = a // r, (e - 1) // r
        # keys some query of the block can see: up to the last query (causal), from the first one's window
        k_hi = min(S, t_hi + 1) if is_causal else S
        k_lo = max(0, t_lo - window + 1) if window is not None else 0
        kb, vb = k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi]
        s = torch.matmul(q_a, kb.transpose(-1, -2)).float() * scale - lse_r[:, :, a:e]
        t_q = torch.arange(a, e, device=q_r.device) // r  # query position of each row
        if mask is not None:
            keep = m[:, :, t_q, k_lo:k_hi]
        elif is_causal:  # top-left aligned, as SDPA
            keep = torch.arange(k_lo, k_hi, device=q_r.device)[None, :] <= t_q[:, None]
        else:
            keep = None
        # P rounded to the input dtype once and dS formed from that: inductor then keeps no fp32 P
        # (11% faster backward; gradients' error vs fp32 unchanged to 5 digits)
        p_t = (s.exp() if keep is None else torch.where(keep, s.exp(), 0.0)).to(dt)
        dp = torch.matmul(do_a, vb.transpose(-1, -2)).float()
        ds_t = (p_t.float() * (dp - delta_r[:, :, a:e])).to(dt)
        # each block's dK, dV zero-padded to all keys and summed once at the end: accumulating into
        # slices of one buffer (`dk[..., lo:hi, :] += ...`) made inductor nest a slice_scatter per block
        # into one huge expression (2.4 ms a layer for a 1M-element sum)
        pad = (0, 0, k_lo, S - k_hi)
        dvs.append(F.pad(torch.matmul(p_t.transpose(-1, -2), do_a).float(), pad))
        dks.append(F.pad(torch.matmul(ds_t.transpose(-1, -2), q_a).float(), pad))
        dqs.append(torch.matmul(ds_t, kb) * scale)
    return torch.cat(dqs, 2), (sum(dks) * scale).to(k.dtype), sum(dvs).to(v.dtype)


_compiled_backward = CompiledOrEager(_backward, "the CPU attention backward")
