"""The training objective: the loss terms and the one function that combines them.

    loss = CE + mtp_loss_weight * MTP + router_aux_loss_coef * LB + router_z_loss_coef * Z

(Mellum 2: weights 0.1, 1e-3 and 1e-3, docs/mellum2.md §3.) The terms, unweighted, as the model
returns them in `Output.losses`:
  ce   mean cross-entropy of token t+1 over the labels that are not -100 (`shifted_ce`, or
       head_loss.linear_ce when no logits are formed)
  mtp  the same for token t+2, from the MTP head
  lb   load balancing (Switch / Megatron): E * sum_e f_e * P_e per MoE layer, f_e the share of routed
       slots (sums to 1), P_e the mean router probability; 1.0 when perfectly balanced; averaged over
       MoE layers (Megatron adds layers, so its coefficient is ours / n_layers). f_e is summed over the
       global batch when a `count_reducer` is given (an all-reduce installed from outside by the trainer).
  z    router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2, averaged over layers.

`objective(losses, weights)` adds the weighted terms that are present, always in the order ce, mtp,
lb, z and left to right, so the model's `out.loss`, the trainer's step and the trainer's logged loss
(Python floats) are one formula. A `StepShare` turns it into one micro-batch's part of an optimiser
step over W ranks x K micro-batches: the token-averaged terms (ce, mtp) are scaled by W * n / N (n
this micro-batch's label tokens of the term, N the whole step's, over every micro-batch and rank;
W undoes FSDP's gradient average), the per-batch router terms by 1 / K. The gradient is then the
gradient of the whole step's mean, whatever the loss mask leaves per micro-batch (the model's, the
pre-trainer's and, with chat masks, SFT's). `weights` may replace a term's weight: the MTP-head
trainer (train/mtp_head.py) gives its own loss weight 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, TypeVar

import torch
import torch.nn.functional as F

from .moe import RouterOut, expert_counts

TERMS = ("ce", "mtp", "lb", "z")
SHIFT = {"ce": 1, "mtp": 2}  # the token-averaged terms: position t predicts token t + shift

T = TypeVar("T", torch.Tensor, float)


def loss_weights(cfg) -> dict[str, float]:
    """Each term's weight from a ModelConfig."""
    return {"ce": 1, "mtp": cfg.mtp_loss_weight, "lb": cfg.router_aux_loss_coef, "z": cfg.router_z_loss_coef}


@dataclass
class StepShare:
    """One micro-batch's share of an optimiser step (see the module docstring)."""

    tokens: Mapping[str, torch.Tensor]  # this micro-batch's label tokens per token-averaged term (label_counts)
    total: Mapping[str, torch.Tensor]  # the same summed over the step's micro-batches and ranks
    world: int = 1  # W ranks
    micro_batches: int = 1  # K micro-batches per rank


def objective(losses: Mapping[str, T], weights: Mapping[str, float], share: StepShare | None = None) -> T:
    """sum over the terms present (order: ce, mtp, lb, z) of weight * term, each scaled by `share`."""
    total = None
    for k in TERMS:
        if k not in losses:
            continue
        x, w = losses[k], weights[k]
        if share is None:
            t = x if w == 1 else w * x
        elif k in SHIFT:
            t = share.world * w * x * share.tokens[k] / share.total[k]
        else:
            t = w * x / share.micro_batches
        total = t if total is None else total + t
    if total is None:
        raise ValueError(f"objective: none of the terms {TERMS} in the losses given ({sorted(losses)})")
    return total


def label_counts(labels_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """The labels (not -100) each token-averaged term is a mean over: 0-d int64 tensors."""
    return {k: (labels_BT[:, s:] != -100).sum() for k, s in SHIFT.items()}


def shifted_ce(logits_BTV, labels_BT, shift: int):
    """Mean CE of logits[:, t] against labels[:, t + shift] over labels != -100 (0 if none)."""
    T_pred = labels_BT.shape[1] - shift
    lg = logits_BTV[:, :T_pred].reshape(-1, logits_BTV.shape[-1]).float()
    tgt = labels_BT[:, shift:shift + T_pred].reshape(-1)
    n = (tgt != -100).sum()
    loss_sum = F.cross_entropy(lg, tgt, ignore_index=-100, reduction="sum")
    return loss_sum / n.clamp(min=1), n


def load_balance_loss(routers: list[RouterOut], num_experts: int, count_reducer=None) -> torch.Tensor:
    """Mean over MoE layers of E * sum_e f_e * P_e (see the module docstring)."""
    counts_LE = torch.stack([expert_counts(r.ids, num_experts) for r in routers]).float()
    if count_reducer is not None:
        counts_LE = count_reducer(counts_LE)
    f_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp(min=1)
    P_LE = torch.stack([r.probs.mean(0) for r in routers])
    return (num_experts * (f_LE * P_LE).sum(-1)).mean()


def z_loss(routers: list[RouterOut]) -> torch.Tensor:
    """Mean over MoE layers of the mean over tokens of logsumexp(router logits)^2."""
    return torch.stack([torch.logsumexp(r.logits, -1).square().mean() for r in routers]).mean()


def router_losses(routers: list[RouterOut], num_experts: int, count_reducer=None) -> dict[str, torch.Tensor]:
    """{'lb', 'z'} of the MoE layers' router outputs (none without MoE layers)."""
    if not routers:
        return {}
    return {"lb": load_balance_loss(routers, num_experts, count_reducer), "z": z_loss(routers)}
