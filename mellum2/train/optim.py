"""Which parameter gets which optimiser, and the pair of optimisers used as one.

Mellum 2 (docs/mellum2.md §3): Muon with Moonlight's update scale for the hidden matrices,
Adam(0.9, 0.95, eps 1e-8) for embeddings and output. Our split:

  Muon  (lr, wd 0.1):          attention q/k/v/o, expert gate/up/down stacks (each expert its own
                                matrix), dense MLP matrices, the MTP fc, and the router
  AdamW (0.9, 0.95, 1e-8):     embedding (wd 0.1), LM head (wd 0.1), RMSNorm gains incl. QK-norm (wd 0)

The router decision (the report is silent): Muon. Measured on `tiny` with the embedded corpus
(150 steps x 2048 tokens, lr 3e-3, docs/train.md): the same CE either way (4.914 vs 4.914), but with
the router on AdamW 89% of (layer, step) samples had a dead expert (share < 1% of uniform),
load-balancing loss 2.85 and normalised routing entropy 0.69; on Muon 27%, 1.58 and 0.82. AdamW
moves every router weight by about lr per step whatever its gradient's size, and the router's
gradient is small and noisy (a 1e-3 aux loss plus the CE's routing signal), so the logits of a few
experts run away; Muon's orthogonalised update has a bounded spectral norm, so no expert's logit
direction can outrun the others in one step.

Both optimisers share one learning rate (Moonlight's scale makes Muon's update RMS match AdamW's),
set every step from the schedule.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.compiled import CompiledOrEager
from .muon import Muon

# name fragments that are removed by wrappers we might see (compile, checkpoint wrappers)
_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _clean(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def param_role(name: str, p: torch.Tensor) -> str:
    """'muon', 'adamw_decay' or 'adamw_nodecay' for a parameter of Mellum2 (see the table above)."""
    name = _clean(name)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "adamw_decay"
    if p.ndim == 1:
        return "adamw_nodecay"  # norms
    if p.ndim in (2, 3):
        return "muon"
    raise ValueError(f"optim: no optimiser rule for parameter {name!r} of shape {tuple(p.shape)}")


class Optimizers:
    """Muon + AdamW stepped together; `set_lr` gives both the same learning rate."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        self.list = [muon, adamw]

    def set_lr(self, lr: float) -> None:
        for opt in self.list:
            for g in opt.param_groups:
                g["lr"] = lr

    @torch.no_grad()
    def step(self) -> None:
        for opt in self.list:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.list:
            opt.zero_grad(set_to_none=True)


def build_optimizers(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                     eps: float = 1e-8, momentum: float = 0.95) -> Optimizers:
    """Build after parallelize() (FSDP swaps in sharded parameters)."""
    groups: dict[str, list] = {"muon": [], "adamw_decay": [], "adamw_nodecay": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[param_role(name, p)].append(p)
    muon = Muon(groups["muon"], lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                adjust_lr_fn="match_rms_adamw")
    # fused: one kernel per tensor for the whole update (CPU and CUDA, plain and DTensor parameters):
    # 3.3 ms a `tiny` step on this CPU, against 9.4 one op at a time (foreach=False) and 9.6 foreach
    adamw = torch.optim.AdamW([{"params": groups["adamw_decay"], "weight_decay": weight_decay},
                               {"params": groups["adamw_nodecay"], "weight_decay": 0.0}],
                              lr=lr, betas=betas, eps=eps, fused=True)
    return Optimizers(muon, adamw)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (same formula: total 2-norm, grads scaled by
    min(1, max_norm / (norm + 1e-6))); max_norm = inf only measures. Plain tensors of >= 1M elements
    in all run compiled: the per-tensor norms and the scaling fused into two passes (tiny: 12.0 ->
    8.5 ms a step on this CPU); sharded (DTensor) gradients, on one mesh or several, take _clip_sharded."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if any(hasattr(g, "full_tensor") for g in grads):
        return _clip_sharded(grads, float(max_norm))
    if sum(g.numel() for g in grads) < _CLIP_COMPILE_FROM:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return _compiled_clip(grads, float(max_norm))


def _clip_sharded(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The same formula for sharded (DTensor) gradients, which may live on different meshes (FSDP's
    and the expert-parallel one): each tensor's norm is made whole (a reduction over its own mesh)
    before the norms are combined, and every rank scales its own shard."""
    norms = [torch.linalg.vector_norm(g) for g in grads]
    norm = torch.linalg.vector_norm(torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n
                                                 for n in norms]))
    if max_norm != float("inf"):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            (g.to_local() if hasattr(g, "to_local") else g).mul_(coef.to(g.dtype))
    return norm


def _clip(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if max_norm != float("inf"):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm


_CLIP_COMPILE_FROM = 1 << 20
_compiled_clip = CompiledOrEager(_clip, "gradient clipping", in_place=True)
