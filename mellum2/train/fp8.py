"""FP8 hybrid precision: tensorwise-scaled FP8 matmuls for the attention projections and the experts.

Mellum 2 trains in BF16 with an FP8 hybrid recipe: tensorwise scaling from the most recent amax
(docs/mellum2.md §3). "Hybrid" is the Transformer-Engine / torchao name for e4m3 in the
forward pass (more mantissa) and e5m2 for gradients (more range). Here:

- which matmuls: q/k/v/o projections of every attention layer (trunk and MTP) and the three expert
  matmuls of every MoE layer. Embeddings, LM head, router, norms, softmax and the MTP fc stay in
  bf16/fp32 (the precision policy of mellum2/model/transformer.py).
- scaling: dynamic, from the amax of the tensor being cast right now (no amax history). One scale
  per tensor: activations, output gradients and each linear weight; an expert stack [E, K, N] has
  one scale per expert matrix (each is its own tensor in the released checkpoint). Scales are
  rounded down to powers of two (as torchao's `round_scales_to_power_of_2`), which costs at most one
  bit of range and makes dequantisation exact in bf16.
- the swap happens from outside the model (`convert_to_fp8`, called by train/parallel.py first,
  before activation checkpointing, compile and FSDP, as torchtitan orders it): q/k/v/o become
  `Float8Linear` (an nn.Linear subclass sharing the same Parameter, so names, checkpoints and the
  optimiser are unchanged) and `experts.gmm` becomes `Float8GroupedMM`.

Two backends that must agree (tests/test_fp8.py), both training forward and backward:
- "scaled_mm": real FP8 GEMMs through `torch._scaled_mm` (fwd e4m3 x e4m3, dgrad e5m2 x e4m3,
  wgrad e5m2 x e4m3, fp32 accumulation), for the linears and, as a loop over the expert groups
  (`_GroupedScaledMM`, one host sync per call for the group offsets), for the experts.
- "emulate": quantise-dequantise to exactly representable bf16 values and run the ordinary bf16
  GEMMs, with a straight-through gradient and the output gradient quantised to e5m2 on the way
  back. Because scales are powers of two, every product is the one an FP8 tensor core forms and
  accumulation is fp32, so only the summation order differs. torch's CPU `_scaled_mm` is a
  reference kernel (about 0.06 GFLOP/s measured here, vs ~100-800 for bf16 AMX), so "auto" emulates
  on CPU and uses `_scaled_mm` for linears on CUDA GPUs with FP8 tensor cores (sm89+). Under
  "auto" the experts emulate on every device: the per-group loop is the reference, not a fast path
  (a fused FP8 grouped GEMM, `torch._scaled_grouped_mm` with rowwise scales on sm90, is the step
  that makes FP8 pay; benchmarks/gpu_check.py measures what exists on a GPU).

The shape rule of `torch._scaled_mm` on CUDA (cuBLASLt): mat1 [M, K] row-major, mat2 [K, N]
column-major, K and N multiples of 16 (M is free). Token counts are rarely multiples of 16, and
the weight gradient reduces over tokens (mat1 = g^T [N, M]), so every call goes through
`_scaled_mm`, which zero-pads K and N up to multiples of 16 (exact: zero rows and columns add
nothing to a dot product and padded output columns are sliced away) and checks the rule itself
(`check_scaled_mm_shapes`) before calling torch, so a CPU run, whose reference kernel accepts any
shape, still catches a call that a GPU would reject.

Legend: M rows (tokens), K reduction, N output width, S routed slots, E experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Attention, compute_dtype
from ..model.moe import Experts

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8_scale(x: torch.Tensor, fp8_dtype: torch.dtype, dims=None) -> torch.Tensor:
    """Power-of-two scale s with |x| s <= max(fp8_dtype); over all of x or reduced over `dims`."""
    x = x.detach()
    amax = x.abs().amax() if dims is None else x.abs().amax(dim=dims, keepdim=True)
    amax = amax.float().clamp(min=1e-30)
    return torch.exp2(torch.floor(torch.log2(torch.finfo(fp8_dtype).max / amax)))


def quantize(x: torch.Tensor, fp8_dtype: torch.dtype, dims=None):
    """(x_fp8, scale): x_fp8 = saturate(x * scale) in `fp8_dtype`."""
    s = fp8_scale(x, fp8_dtype, dims)
    fmax = torch.finfo(fp8_dtype).max
    return (x.float() * s).clamp(-fmax, fmax).to(fp8_dtype), s


def fake_quantize(x: torch.Tensor, fp8_dtype: torch.dtype, out_dtype: torch.dtype, dims=None) -> torch.Tensor:
    """The values an FP8 GEMM sees, held exactly in `out_dtype` (bf16 or fp32)."""
    x8, s = quantize(x, fp8_dtype, dims)
    return (x8.to(out_dtype) / s.to(out_dtype))


class _Quant(torch.autograd.Function):
    """Forward: e4m3 fake-quantise into the compute dtype. Backward: straight through (to the master)."""

    @staticmethod
    def forward(ctx, x, out_dtype, dims):
        ctx.in_dtype = x.dtype
        return fake_quantize(x, E4M3, out_dtype, dims)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.in_dtype), None, None


class _GradQuant(torch.autograd.Function):
    """Forward: identity. Backward: the incoming gradient fake-quantised to e5m2."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return fake_quantize(g, E5M2, g.dtype)


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


SCALED_MM_MULTIPLE = 16  # cuBLASLt's FP8 rule for K and N (see the module docstring)


def check_scaled_mm_shapes(a: torch.Tensor, b: torch.Tensor) -> None:
    """The CUDA shape rule of `torch._scaled_mm(a [M, K], b [K, N])`, checked on every device."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"torch._scaled_mm: expected a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    K, N = b.shape
    if K % SCALED_MM_MULTIPLE or N % SCALED_MM_MULTIPLE:
        raise ValueError(f"torch._scaled_mm: K={K} and N={N} (a {tuple(a.shape)}, b {tuple(b.shape)}) must be "
                         f"multiples of {SCALED_MM_MULTIPLE}; pad them (fp8._scaled_mm does)")
    if a.stride(1) != 1 or b.stride(0) != 1:
        raise ValueError(f"torch._scaled_mm: a must be row-major and b column-major, got strides "
                         f"{a.stride()} and {b.stride()}")


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """t [r, c] in a zero [rows, cols] buffer (FP8 zeros are exact zeros); t itself when it fits."""
    if t.shape == (rows, cols):
        return t
    out = t.new_zeros(rows, cols)
    out[:t.shape[0], :t.shape[1]] = t
    return out


def _round_up(n: int, m: int = SCALED_MM_MULTIPLE) -> int:
    return (n + m - 1) // m * m


def _scaled_mm(a8, sa, b8, sb, out_dtype):
    """(a8 / sa) @ (b8 / sb) with fp32 accumulation for a [M, K], b [K, N] of any K, N: both are
    zero-padded to multiples of 16 and the output's padded columns dropped (exact)."""
    M, K = a8.shape
    N = b8.shape[1]
    Kp, Np = _round_up(K), _round_up(N)
    a = _pad_to(a8, M, Kp).contiguous()
    b = _col_major(_pad_to(b8, Kp, Np))
    check_scaled_mm_shapes(a, b)
    y = torch._scaled_mm(a, b, scale_a=sa.reciprocal().reshape(()), scale_b=sb.reciprocal().reshape(()),
                         out_dtype=out_dtype)
    return y if Np == N else y[:, :N]


class _LinearScaledMM(torch.autograd.Function):
    """y = x W^T with three real FP8 GEMMs (fwd, dgrad, wgrad)."""

    @staticmethod
    def forward(ctx, x_MK, w_NK, out_dtype):
        x8, sx = quantize(x_MK, E4M3)
        w8, sw = quantize(w_NK, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.dtypes = (x_MK.dtype, w_NK.dtype)
        return _scaled_mm(x8, sx, w8.t(), sw, out_dtype)

    @staticmethod
    def backward(ctx, g_MN):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = quantize(g_MN, E5M2)
        gx_MK = _scaled_mm(g8, sg, w8, sw, ctx.dtypes[0])
        gw_NK = _scaled_mm(g8.t(), sg, x8, sx, torch.float32).to(ctx.dtypes[1])
        return gx_MK, gw_NK, None


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "emulate", "scaled_mm"):
        raise ValueError(f"fp8 backend must be 'auto', 'emulate' or 'scaled_mm', got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return "scaled_mm"
    return "emulate"


def fp8_linear(x: torch.Tensor, w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [..., K] @ w [N, K]^T through FP8; the output has the compute (autocast) dtype."""
    out_dtype = compute_dtype(x)
    backend = resolve_backend(backend, x.device)
    lead = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False):
        if backend == "scaled_mm":
            y = _LinearScaledMM.apply(x.reshape(-1, x.shape[-1]), w, out_dtype)
        else:
            y = F.linear(_Quant.apply(x.reshape(-1, x.shape[-1]), out_dtype, None), _Quant.apply(w, out_dtype, None))
            y = _GradQuant.apply(y)
    return y.reshape(*lead, w.shape[0])


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in FP8 (no bias: Mellum has none). Shares the original Parameter."""

    backend: str = "auto"

    @classmethod
    def from_linear(cls, lin: nn.Linear, backend: str = "auto") -> "Float8Linear":
        if lin.bias is not None:
            raise ValueError("Float8Linear: linears with a bias are not converted (Mellum has none)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight
        new.register_parameter("bias", None)
        new.backend = backend
        return new

    def forward(self, x):
        return fp8_linear(x, self.weight, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.backend}"


class _GroupedScaledMM(torch.autograd.Function):
    """y_SN = grouped x_SK @ w_EKN with real FP8 GEMMs per expert group: the forward, dgrad and wgrad
    of `_LinearScaledMM` for each group (rows past the last group stay zero, as nothing reads them).
    Scales as the emulated path: one for x, one per expert matrix, one for the output gradient."""

    @staticmethod
    def forward(ctx, x_SK, w_EKN, offs_E, out_dtype):
        x8, sx = quantize(x_SK, E4M3)
        w8, sw_E11 = quantize(w_EKN, E4M3, dims=(1, 2))
        ends = offs_E.tolist()  # the one host sync: group bounds decide the slices
        out_SN = x_SK.new_zeros(x_SK.shape[0], w_EKN.shape[2], dtype=out_dtype)
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                out_SN[start:end] = _scaled_mm(x8[start:end], sx, w8[e], sw_E11[e], out_dtype)
            start = end
        ctx.save_for_backward(x8, sx, w8, sw_E11)
        ctx.ends, ctx.dtypes = ends, (x_SK.dtype, w_EKN.dtype)
        return out_SN

    @staticmethod
    def backward(ctx, g_SN):
        x8, sx, w8, sw_E11 = ctx.saved_tensors
        g8, sg = quantize(g_SN, E5M2)
        gx_SK = torch.zeros(x8.shape, dtype=ctx.dtypes[0], device=x8.device)
        gw_EKN = torch.zeros(w8.shape, dtype=torch.float32, device=w8.device)
        start = 0
        for e, end in enumerate(ctx.ends):
            if end > start:
                gx_SK[start:end] = _scaled_mm(g8[start:end], sg, w8[e].t(), sw_E11[e], ctx.dtypes[0])
                gw_EKN[e] = _scaled_mm(x8[start:end].t(), sx, g8[start:end], sg, torch.float32)
            start = end
        return gx_SK, gw_EKN.to(ctx.dtypes[1]), None, None


class Float8GroupedMM:
    """Drop-in for `experts.gmm(x_SK, w_EKN, offs=offs_E) -> y_SN` with FP8 operands (see docstring)."""

    def __init__(self, backend: str = "auto"):
        if backend not in ("auto", "emulate", "scaled_mm"):
            raise ValueError(f"fp8 backend must be 'auto', 'emulate' or 'scaled_mm', got {backend!r}")
        self.backend = backend

    def __call__(self, x_SK, w_EKN, offs=None):
        out_dtype = x_SK.dtype
        if self.backend == "scaled_mm":  # the per-group reference ("auto" emulates experts, see docstring)
            with torch.autocast(x_SK.device.type, enabled=False):
                return _GroupedScaledMM.apply(x_SK, w_EKN, offs, out_dtype)
        xq = _Quant.apply(x_SK, out_dtype, None)
        wq = _Quant.apply(w_EKN, out_dtype, (1, 2))
        return _GradQuant.apply(F.grouped_mm(xq, wq, offs=offs))

    def __repr__(self):
        return f"Float8GroupedMM(backend={self.backend!r})"


def convert_to_fp8(model: nn.Module, backend: str = "auto") -> dict[str, int]:
    """Swap the attention projections and expert matmuls of a Mellum2 to FP8, in place.
    Returns how many of each were converted (the caller logs it)."""
    n = {"linears": 0, "experts": 0}
    for m in model.modules():
        if isinstance(m, Attention):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(m, name)
                if not isinstance(lin, Float8Linear):
                    setattr(m, name, Float8Linear.from_linear(lin, backend))
                    n["linears"] += 1
        elif isinstance(m, Experts):
            if not isinstance(m.gmm, Float8GroupedMM):
                m.gmm = Float8GroupedMM(backend)
                n["experts"] += 1
    return n
