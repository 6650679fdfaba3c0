"""Muon (Jordan et al. 2024; Moonlight, Liu et al. 2025): momentum, then orthogonalise, for matrices
and for stacks of matrices (MoE experts).

Same constructor as `torch.optim.Muon` (torch 2.13), same numerics on 2-D parameters (the test
compares both bit for bit): EMA momentum `buf <- lerp(buf, g, 1 - mu)`, Nesterov `u = lerp(g, buf, mu)`,
five quintic Newton-Schulz steps in bf16 with coefficients (3.4445, -4.7750, 2.0315) after
normalising by the Frobenius norm, decoupled weight decay `p <- p (1 - lr wd)`, then
`p <- p - lr_adj O`. With `adjust_lr_fn="match_rms_adamw"` (what pre-training uses) lr_adj is
Moonlight's `0.2 sqrt(max(rows, cols)) lr`, which gives the update the RMS of an AdamW update so one
learning rate serves both optimisers (Mellum 2 report, §3 of docs/mellum2.md).

What is added over torch's:
- 3-D parameters [E, rows, cols] are E independent matrices (MoE experts): one batched Newton-Schulz
  (`baddbmm`) over the leading dimension; the rows/cols of the scale are the last two dimensions.
  `zeropower_looped` is the obviously correct per-matrix reference (tests/test_muon.py).
- matrices of the same shape (the experts of all layers, every layer's q_proj, ...) are stacked and
  orthogonalised in one batched Newton-Schulz per shape (in chunks of at most 128M elements, 2M on
  a CPU, where a chunk then stays in cache); a shape held by a single 2-D matrix takes torch's exact
  2-D path.
- a chunk of at least `_COMPILE_FROM` (1M) elements runs compiled (`_chunk_update`: inductor fuses
  the momentum, casts, concatenation, normalisation, decay and update around the same matmul calls):
  equal to the eager step up to fp32 rounding in those passes, which the bf16 Newton-Schulz turns into
  a ~1% difference of the update (tests/test_muon.py bounds it); `tiny`'s step 95 -> 70-80 ms. Smaller
  chunks (the tests against torch, toy models) run eagerly, bit for bit as above.
- `lr` may be a 0-d tensor (schedules then never change a Python constant under torch.compile).
- FSDP2 / DTensor parameters (train/parallel.py). Decision: FSDP2 shards dim 0, which for an expert
  stack means whole experts per rank, so 3-D parameters are orthogonalised locally with no
  communication. A 2-D matrix sharded by rows is gathered (`full_tensor`), orthogonalised on every
  rank (redundant but exact: every rank derives the same O) and each rank keeps its own rows. At
  12B scale the 2-D matrices are the attention projections (about 5% of parameters), so the gather is
  small next to the experts; distributing the 2-D work round-robin over ranks is the next step.
  Momentum buffers are DTensors shaped like their parameter, so distributed checkpointing gathers them.

Shapes: E leading batch (experts), R rows, C columns of each matrix.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels.compiled import CompiledOrEager

try:  # DTensor exists in every torch we support; guarded so a stripped build still imports
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = Shard = distribute_tensor = None

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower(g: Tensor, coeffs=NS_COEFFICIENTS, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate U V^T of g = U S V^T for a matrix [R, C] or a stack [E, R, C]; result in bf16.

    Works on the wide orientation (R <= C) so the Gram matrices are the small R x R ones."""
    if g.ndim not in (2, 3):
        raise ValueError(f"zeropower: expected a 2-D or 3-D tensor, got shape {tuple(g.shape)}")
    a, b, c = coeffs
    tall = g.shape[-2] > g.shape[-1]
    x = g.bfloat16()
    if tall:
        x = x.mT
    if g.ndim == 2:
        x = x / x.norm().clamp(min=eps)
        for _ in range(steps):
            gram_RR = x @ x.T
            poly_RR = torch.addmm(gram_RR, gram_RR, gram_RR, beta=b, alpha=c)
            x = torch.addmm(x, poly_RR, x, beta=a)
    else:
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram_ERR = x @ x.mT
            poly_ERR = torch.baddbmm(gram_ERR, gram_ERR, gram_ERR, beta=b, alpha=c)
            x = torch.baddbmm(x, poly_ERR, x, beta=a)
    return x.mT if tall else x


def zeropower_looped(g_ERC: Tensor, coeffs=NS_COEFFICIENTS, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Reference for the batched path: one 2-D Newton-Schulz per matrix of the stack."""
    return torch.stack([zeropower(g, coeffs, steps, eps) for g in g_ERC])


def update_scale(shape, adjust_lr_fn: str | None) -> float:
    """Multiplier of lr for one matrix of `shape` (rows, cols are the last two dimensions)."""
    rows, cols = shape[-2], shape[-1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":  # Keller Jordan's
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":  # Moonlight's
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"Muon: adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


def _local(t: Tensor) -> Tensor:
    """The tensor this rank holds (itself unless a DTensor); in-place edits reach the parameter."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _experts_whole_on_rank(p) -> bool:
    """True when each rank holds whole matrices of a 3-D DTensor (sharded only along dim 0)."""
    return p.ndim == 3 and all(not isinstance(pl, Shard) or pl.dim == 0 for pl in p.placements)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D and 3-D parameters; see the module docstring. Arguments as torch.optim.Muon."""

    def __init__(self, params, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"Muon: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if not lr >= 0:
            raise ValueError(f"Muon: lr must be >= 0, got {lr}")
        if not momentum >= 0:
            raise ValueError(f"Muon: momentum must be >= 0, got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"Muon: weight_decay must be >= 0, got {weight_decay}")
        if not 0 < ns_steps < 100:
            raise ValueError(f"Muon: ns_steps must be in 1..99, got {ns_steps}")
        if len(ns_coefficients) != 3:
            raise ValueError(f"Muon: ns_coefficients must be three numbers, got {ns_coefficients!r}")
        update_scale((1, 1), adjust_lr_fn)  # validates the name
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon: parameters must be matrices [R, C] or expert stacks [E, R, C]; "
                                     f"got shape {tuple(p.shape)} (optimise it with AdamW)")

    def _gathered(self, u: Tensor, p, ns: dict) -> Tensor:
        """O for the local rows of a DTensor matrix whose rows are split over ranks (gather, NS, slice)."""
        full = DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        o = zeropower(full, **ns)
        return distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None).to_local()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu, nesterov = group["lr"], group["weight_decay"], group["momentum"], group["nesterov"]
            ns = dict(coeffs=group["ns_coefficients"], steps=group["ns_steps"], eps=group["eps"])
            # matrices of one shape are orthogonalised together (one batched Newton-Schulz per bucket):
            # on CPU a layer's small matrices are dominated by per-op overhead otherwise
            buckets: dict[tuple[int, int], list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("Muon: sparse gradients and complex parameters are not supported")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                g, buf = _local(p.grad), _local(state["momentum_buffer"])
                if DTensor is not None and isinstance(p, DTensor) and not _experts_whole_on_rank(p):
                    u = _momentum(g, buf, mu, nesterov)
                    self._apply(p, self._gathered(u, p, ns), lr, wd, group)
                elif g.numel():
                    buckets.setdefault(tuple(g.shape[-2:]), []).append((p, g, buf))
            for items in buckets.values():
                if len(items) == 1 and items[0][1].ndim == 2:  # exactly torch.optim.Muon's 2-D path
                    p, g, buf = items[0]
                    self._apply(p, zeropower(_momentum(g, buf, mu, nesterov), **ns), lr, wd, group)
                    continue
                for chunk in _chunks(items, _max_batch_numel(items[0][1].device)):
                    args = ([_local(p) for p, _, _ in chunk], [g for _, g, _ in chunk], [b for _, _, b in chunk])
                    scales = [update_scale(p.shape, group["adjust_lr_fn"]) for p, _, _ in chunk]
                    if sum(g.numel() for g in args[1]) >= _COMPILE_FROM:
                        # fused momentum, casts, normalisation, decay and update: 95 -> 70 ms a `tiny` step
                        lr_t = torch.as_tensor(lr, dtype=torch.float32, device=args[0][0].device)
                        _compiled_chunk_update(*args, lr_t, wd, mu, nesterov, scales, *ns.values())
                    else:
                        _chunk_update(*args, lr, wd, mu, nesterov, scales, *ns.values())
        return loss

    @staticmethod
    def _apply(p, o: Tensor, lr, wd: float, group) -> None:
        """Decoupled weight decay, then the scaled orthogonal update, on this rank's part of p."""
        _decay_and_update(_local(p), o, lr, wd, update_scale(p.shape, group["adjust_lr_fn"]))


def _momentum(g: Tensor, buf: Tensor, mu: float, nesterov: bool) -> Tensor:
    """EMA momentum in place (`buf <- lerp(buf, g, 1 - mu)`); the update direction (Nesterov or not)."""
    buf.lerp_(g, 1 - mu)
    return g.lerp(buf, mu) if nesterov else buf


def _decay_and_update(w: Tensor, o: Tensor, lr, wd: float, scale: float) -> None:
    w.mul_(1 - lr * wd)
    if isinstance(lr, Tensor):
        w.sub_(o.to(w.dtype) * (lr * scale).to(w.dtype))
    else:
        w.add_(o, alpha=-(lr * scale))


def _chunk_update(ws, gs, bufs, lr, wd, mu, nesterov, scales, coeffs, steps, eps) -> None:
    """Muon's step for same-shape matrices (ws: this rank's weights, gs grads, bufs momenta; each
    [R, C] or [E, R, C] with the same R, C): momentum, one batched Newton-Schulz over all their
    matrices, decay and update, all in place."""
    u_NRC = torch.cat([_momentum(g, b, mu, nesterov).bfloat16().reshape(-1, *g.shape[-2:])
                       for g, b in zip(gs, bufs)])
    o_NRC = zeropower(u_NRC, coeffs, steps, eps)
    start = 0
    for w, g, scale in zip(ws, gs, scales):
        n = g.numel() // (g.shape[-2] * g.shape[-1])
        _decay_and_update(w, o_NRC[start:start + n].view(g.shape), lr, wd, scale)
        start += n


# Large chunks run compiled: inductor fuses the element-wise passes around the matmuls (momentum,
# bf16 cast, concatenation, normalisation, decay, update) into a few kernels. Same operations, so the
# same result up to fp32 rounding inside the fused passes (the Newton-Schulz matmuls are the same
# calls); tests/test_muon.py bounds the difference. Small chunks (tests, toy models) stay eager and
# bit for bit equal to torch.optim.Muon per matrix.
_COMPILE_FROM = 1 << 20  # elements in a chunk
_compiled_chunk_update = CompiledOrEager(_chunk_update, "Muon's update", recompile_limit=64, in_place=True)


_BUCKET_NUMEL = 1 << 27  # at most 128M elements (256 MB in bf16) orthogonalised in one batch
# on a CPU, batches of ~2M elements (4 MB in bf16) keep the five Newton-Schulz steps in L2: Muon's step
# on `tiny` 130 -> 98 ms at 2 threads (1M: 132, 4M: 102); the result is the same (matrices are independent)
_CPU_CHUNK_NUMEL = 1 << 21


def _max_batch_numel(device) -> int:
    return _CPU_CHUNK_NUMEL if device.type == "cpu" else _BUCKET_NUMEL


def _chunks(items, max_numel: int):
    chunk, size = [], 0
    for it in items:
        if chunk and size + it[1].numel() > max_numel:
            yield chunk
            chunk, size = [], 0
        chunk.append(it)
        size += it[1].numel()
    if chunk:
        yield chunk
