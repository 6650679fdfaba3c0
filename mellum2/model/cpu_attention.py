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
S is rounded to bf16 before the exp, as in an eager bf16 attention); P and dS are formed in fp32 and
rounded to the input dtype for the matmuls; dK and dV accumulate in fp32 across blocks.
GQA: the r = H/G query heads of a kv head are stacked along the rows ([B, G, r*T, d]), so each kv
head's gradient is one matmul over all its query heads.

Used by `layers.attend` for the cache-free forward on a CPU in bf16 when gradients are needed
(training); fp32, inference and GPUs keep plain SDPA. The backward is compiled (inductor fuses its
elementwise passes) for sequences of useful size: 26 vs 32 ms forward + backward per layer eager,
22-26 vs 32 inside the compiled training step.
tests/test_cpu_attention.py checks values and gradients against SDPA (and the bf16 error against SDPA's).
"""
from __future__ import annotations

import torch

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def wanted(q: torch.Tensor, dtype: torch.dtype) -> bool:
    """Use `attention` for q attending in `dtype`: on a CPU, bf16, when a gradient is needed (training).
    In fp32 SDPA's own backward is the faster one (measured 43 vs 60 ms for the sizes above)."""
    return q.device.type == "cpu" and dtype == torch.bfloat16 and q.requires_grad and torch.is_grad_enabled()


def attention(q_BHTd, k_BGTd, v_BGTd, mask=None, is_causal: bool = False, block_rows: int = 1024):
    """Attention of H query heads over G kv heads (H % G == 0) like F.scaled_dot_product_attention
    with enable_gqa; mask: boolean, True = attend, broadcastable to [B, 1, T, S] (or is_causal)."""
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"cpu_attention: the mask must be boolean, got {mask.dtype}")
    return _Attention.apply(q_BHTd, k_BGTd, v_BGTd, mask, is_causal, block_rows)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, block_rows):
        add = None
        if mask is not None:  # the flash kernel takes an additive mask in the query dtype
            add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        o, lse = _FLASH_CPU(q, k, v, 0.0, is_causal, attn_mask=add)[:2]
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.is_causal, ctx.block_rows = is_causal, block_rows
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        B, H, T, d = q.shape
        G, S = k.shape[1], k.shape[2]
        r = H // G
        # rows of a kv head: its r query heads stacked ([B, G, r*T, ...]); row j is (head j // T, query j % T)
        q_r = q.reshape(B, G, r * T, d)
        do_r = do.to(q.dtype).reshape(B, G, r * T, d)
        lse_r = lse.reshape(B, G, r * T, 1)
        delta_r = (do.float() * o.float()).sum(-1).reshape(B, G, r * T, 1)
        args = (q_r, k, v, do_r, lse_r, delta_r, mask, ctx.is_causal, T, ctx.block_rows)
        dq, dk, dv = _backward(*args) if torch.compiler.is_compiling() or B * H * T * S < _COMPILE_FROM \
            else _compiled_backward(*args)
        return dq.view(B, H, T, d), dk, dv, None, None, None


_COMPILE_FROM = 1 << 20  # score entries from which the eager backward runs compiled (fused elementwise)
_compiled = None


def _compiled_backward(*args):
    """`_backward` compiled once per shape (inductor fuses the fp32 elementwise passes over the [rows, S]
    blocks: 22 vs 43 ms eager for the sizes in the module docstring). Where compiling fails (no C++
    compiler), the eager version, with one warning."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_backward, dynamic=False)
    if _compiled is not False:
        try:
            return _compiled(*args)
        except Exception as e:  # noqa: BLE001 (inductor raises many kinds; the eager path is always right)
            import warnings
            warnings.warn(f"mellum2: compiling the CPU attention backward failed ({type(e).__name__}: {e}); "
                          "using the eager backward", stacklevel=2)
            _compiled = False
    return _backward(*args)


def _backward(q_r, k, v, do_r, lse_r, delta_r, mask, is_causal: bool, T: int, block_rows: int):
    """dq [B, G, r*T, d], dk, dv [B, G, S, d] from stacked rows (see _Attention.backward)."""
    B, G, R, d = q_r.shape
    S = k.shape[2]
    scale, dt = d ** -0.5, q_r.dtype
    if mask is not None:  # [b, 1, T, S] -> per stacked row [b, 1, T, S] indexed by j % T
        m = mask.expand(*mask.shape[:-2], T, S)
        m = m.reshape(m.shape[0], 1, T, S) if m.dim() == 4 else m.reshape(1, 1, T, S)
    kT, vT = k.transpose(-1, -2), v.transpose(-1, -2)
    dqs = []
    dk = torch.zeros(B, G, S, d, dtype=torch.float32, device=q_r.device)
    dv = torch.zeros_like(dk)
    C = max(1, block_rows)
    for a in range(0, R, C):
        e = min(a + C, R)
        s = torch.matmul(q_r[:, :, a:e], kT).float() * scale - lse_r[:, :, a:e]
        t_q = torch.arange(a, e, device=q_r.device) % T  # query position of each row
        if mask is not None:
            p = torch.where(m[:, :, t_q], s.exp(), 0.0)
        elif is_causal:  # top-left aligned, as SDPA
            p = torch.where(torch.arange(S, device=q_r.device)[None, :] <= t_q[:, None], s.exp(), 0.0)
        else:
            p = s.exp()
        dp = torch.matmul(do_r[:, :, a:e], vT).float()
        ds = p * (dp - delta_r[:, :, a:e])
        p_t, ds_t = p.to(dt), ds.to(dt)
        dv = dv + torch.matmul(p_t.transpose(-1, -2), do_r[:, :, a:e]).float()
        dk = dk + torch.matmul(ds_t.transpose(-1, -2), q_r[:, :, a:e]).float()
        dqs.append(torch.matmul(ds_t, k) * scale)
    return torch.cat(dqs, 2), (dk * scale).to(k.dtype), dv.to(v.dtype)
