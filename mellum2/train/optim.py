"""Which parameter gets which optimiser, and the pair of optimisers used as one.

Mellum 2 (docs/mellum2-facts.md §3): Muon with Moonlight's update scale for the hidden matrices,
Adam(0.9, 0.95, eps 1e-8) for embeddings and output. Our split:

  Muon  (2-D/3-D, lr, wd 0.1):  attention q/k/v/o, expert gate/up/down stacks (each expert its own
                                matrix), dense MLP matrices, the MTP fc
  AdamW (0.9, 0.95, 1e-8):     embedding (wd 0.1), LM head (wd 0.1),
                                RMSNorm gains incl. QK-norm (wd 0), router (wd 0)

The router decision: AdamW, fp32, no weight decay. The router is an E x D classifier whose rows
compete through a softmax; Muon would replace its update by an orthogonal matrix (all singular
values ~1), i.e. move every expert's logit direction by the same amount every step, which fights the
small, targeted corrections that load balancing needs (most of the gradient mass of a router sits in
a few directions: the over- and under-used experts). Moonlight and Kimi K2 likewise keep small
non-hidden matrices out of Muon's orthogonalisation, and weight decay on the router would pull the
logits towards uniform routing, which the aux and z losses already manage. This is recorded in
docs/train.md with the measurement that backs it.

Both optimisers share one learning rate (Moonlight's scale makes Muon's update RMS match AdamW's),
set every step from the schedule.
"""
from __future__ import annotations

import torch
from torch import nn

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
    if name.endswith("mlp.gate.weight"):
        return "adamw_nodecay"  # router
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
    # foreach=False: one tensor at a time is as fast on CPU and works for DTensor and plain tensors alike
    adamw = torch.optim.AdamW([{"params": groups["adamw_decay"], "weight_decay": weight_decay},
                               {"params": groups["adamw_nodecay"], "weight_decay": 0.0}],
                              lr=lr, betas=betas, eps=eps, foreach=False)
    return Optimizers(muon, adamw)
