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

Two backends that must agree (tests/test_fp8.py):
- "scaled_mm": real FP8 GEMMs through `torch._scaled_mm` (fwd e4m3 x e4m3, dgrad e5m2 x e4m3,
  wgrad e5m2 x e4m3, fp32 accumulation). For experts a loop of `_scaled_mm` over the groups (the
  obviously correct reference; it syncs once per call for the group offsets).
- "emulate": quantise-dequantise to exactly representable bf16 values and run the ordinary bf16
  GEMMs, with a straight-through gradient and the output gradient quantised to e5m2 on the way
  back. Because scales are powers of two, every product is the one an FP8 tensor core forms and
  accumulation is fp32, so only the summation order differs. torch's CPU `_scaled_mm` is a
  reference kernel (about 0.06 GFLOP/s measured here, vs ~100-800 for bf16 AMX), so "auto" emulates
  on CPU and uses `_scaled_mm` for linears on CUDA GPUs with FP8 tensor cores (sm89+). Experts
  emulate on every device for now: a fused FP8 grouped GEMM (`torch._scaled_grouped_mm`, rowwise
  scales, sm90+) is the next step and could not be tested on this CPU-only machine.

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


def _scaled_mm(a8, sa, b8, sb, out_dtype):
    """(a8 / sa) @ (b8 / sb) with fp32 accumulation; a row-major, b column-major (cuBLASLt's rule)."""
    return torch._scaled_mm(a8.contiguous(), _col_major(b8), scale_a=sa.reciprocal().reshape(()),
                            scale_b=sb.reciprocal().reshape(()), out_dtype=out_dtype)


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


def _grouped_scaled_mm_loop(x_SK, w_EKN, offs_E, out_dtype):
    """Reference FP8 grouped matmul: per-expert `torch._scaled_mm` (forward only)."""
    x8, sx = quantize(x_SK, E4M3)
    w8, sw_E11 = quantize(w_EKN, E4M3, dims=(1, 2))
    out_SN = x_SK.new_zeros(x_SK.shape[0], w_EKN.shape[2], dtype=out_dtype)
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            out_SN[start:end] = _scaled_mm(x8[start:end], sx, w8[e], sw_E11[e], out_dtype)
        start = end
    return out_SN


class Float8GroupedMM:
    """Drop-in for `experts.gmm(x_SK, w_EKN, offs=offs_E) -> y_SN` with FP8 operands (see docstring)."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(self, x_SK, w_EKN, offs=None):
        out_dtype = x_SK.dtype
        if self.backend == "scaled_mm":  # reference, forward only
            return _grouped_scaled_mm_loop(x_SK, w_EKN, offs, out_dtype)
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
