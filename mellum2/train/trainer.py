"""The training step and loop, reusable by pre-training, the long-context stage and SFT.

One optimiser step = K micro-batches (gradient accumulation) on every one of W ranks. The objective
(mellum2/model/objective.py, the model's own) is normalised over the *global* step, so W ranks x K
micro-batches give the gradient one process would get from the whole batch, whatever the loss mask
(labels -100) leaves per micro-batch:

  loss = sum_tokens CE / N1 + w_mtp sum_tokens CE_mtp / N2 + c_lb mean(LB) + c_z mean(Z)

N1 / N2 count the label tokens of the next-token / MTP targets over all micro-batches and ranks (one
small all-reduce before the first forward), the router losses are averaged over micro-batches and
ranks, and FSDP's gradient average over ranks is undone by the factor W on the summed terms
(`objective(..., StepShare)`). The weights come from the model config (mtp_loss_weight 0.1,
router_aux_loss_coef and router_z_loss_coef 1e-3); the model returns the unweighted terms. The loss
logged for a step is the same `objective` of the step's means.

Robustness: a step whose gradient norm is not finite is not applied (gradients dropped, optimiser
state untouched; the step still consumes its data and its place in the schedule) and is logged with
`skipped: true`; after `max_bad_steps` in a row, `TrainingDiverged` is raised before anything more
is saved, so the last good checkpoint stays the newest. That check is the one host sync per step;
all other numbers stay on the device until the logging interval.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from mellum2.model.objective import SHIFT, StepShare, label_counts, loss_weights, objective

from .errors import TrainingDiverged
from .metrics import expert_load
from .optim import clip_grad_norm
from .parallel import CountTap, Dist, all_reduce_sum

STATS = ("ce_sum", "n1", "mtp_sum", "n2", "lb_sum", "z_sum", "n_mb")


@dataclass
class StepRecord:
    step: int  # finished steps after this one
    tokens: int
    lr: float
    phase: int
    grad_norm: torch.Tensor  # 0-d, global
    skipped: bool
    stats: torch.Tensor  # [len(STATS)] local sums (reduced at log time)
    counts_LE: torch.Tensor | None  # global routed-slot counts of this step


@dataclass
class Trainer:
    model: torch.nn.Module
    optims: object  # optim.Optimizers
    schedule: object  # callable step -> lr
    loader: object
    d: Dist
    grad_accum: int = 1
    precision: str = "bf16"  # or "fp32"
    clip: float = 1.0  # 0 = no clipping (the norm is still computed and logged)
    max_bad_steps: int = 5
    tap: CountTap | None = None
    step: int = 0  # finished optimiser steps
    tokens: int = 0  # global tokens consumed
    bad_streak: int = 0
    skipped_total: int = 0
    pending: list[StepRecord] = field(default_factory=list)

    def __post_init__(self):
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"Trainer.precision: expected 'bf16' or 'fp32', got {self.precision!r}")
        self._it = iter(self.loader)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _next_batches(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(self.grad_accum):
            try:
                b = next(self._it)
            except StopIteration:
                raise RuntimeError(f"the loader ran out of data at step {self.step} (tokens {self.tokens}); "
                                   f"it was built for fewer tokens than the run needs") from None
            moved = {k: v.to(self.d.device, non_blocking=True) for k, v in b.items()}
            # whether a row packs several documents, decided on the host copy: the model would
            # otherwise find out with a host sync in every forward (model/decoder.py packed_doc_ids)
            pos = b.get("position_ids")
            moved["packed"] = None if pos is None else bool((pos.diff(dim=-1) != 1).any())
            out.append(moved)
        return out

    def _set_grad_sync(self, on: bool) -> None:
        if self.d.enabled and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(on)

    def train_step(self) -> StepRecord:
        weights = loss_weights(self.model.cfg)
        batches = self._next_batches()
        dev = self.d.device
        # global label counts of the token-averaged terms (next token, and token t+2 for MTP)
        counts = [label_counts(b["labels"]) for b in batches]
        n_loc = torch.zeros(len(SHIFT), dtype=torch.float64, device=dev)
        for c in counts:
            for j, k in enumerate(SHIFT):
                n_loc[j] += c[k]
        N = all_reduce_sum(n_loc.clone(), self.d).clamp(min=1)
        total = {k: N[j].float() for j, k in enumerate(SHIFT)}
        W, K = self.d.world, self.grad_accum
        stats = torch.zeros(len(STATS), dtype=torch.float64, device=dev)
        for i, b in enumerate(batches):
            self._set_grad_sync(i == K - 1)
            with self.autocast():
                out = self.model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"],
                                 return_logits=False, packed=b["packed"])
            L, n = out.losses, counts[i]
            obj = objective(L, weights, StepShare(n, total, W, K))
            row = [L["ce"].detach() * n["ce"], n["ce"]]
            if "mtp" in L:
                row += [L["mtp"].detach() * n["mtp"], n["mtp"]]
            else:
                row += [torch.zeros((), device=dev)] * 2
            if "lb" in L:
                row += [L["lb"].detach(), L["z"].detach()]
            else:
                row += [torch.zeros((), device=dev)] * 2
            row.append(torch.ones((), device=dev))
            stats += torch.stack([r.double() for r in row])
            obj.backward()
        norm = clip_grad_norm(self.model.parameters(), self.clip if self.clip > 0 else float("inf"))
        lr = self.schedule(self.step)
        ok = bool(torch.isfinite(norm))  # the one host sync per step (see the module docstring)
        if ok:
            self.optims.set_lr(lr)
            self.optims.step()
            self.bad_streak = 0
        else:
            self.bad_streak += 1
            self.skipped_total += 1
        self.optims.zero_grad()
        phase = int(getattr(self.loader, "phase", 0))
        self.step += 1
        self.tokens += sum(b["input_ids"].numel() for b in batches) * W
        rec = StepRecord(self.step, self.tokens, lr, phase, norm.detach(), not ok, stats,
                         self.tap.take() if self.tap is not None else None)
        self.pending.append(rec)
        if self.bad_streak >= self.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_streak} non-finite steps in a row (steps {self.step - self.bad_streak + 1}..{self.step}, "
                f"--max-bad-steps {self.max_bad_steps}); stopping without saving")
        return rec

    def drain(self) -> list[dict]:
        """Reduce and fetch the pending records (one all-reduce + one host sync), as dicts for logging."""
        if not self.pending:
            return []
        weights = loss_weights(self.model.cfg)
        stats = all_reduce_sum(torch.stack([r.stats for r in self.pending]), self.d).cpu()
        norms = torch.stack([r.grad_norm.double() for r in self.pending]).cpu().tolist()
        out = []
        for r, s, gn in zip(self.pending, stats.tolist(), norms):
            v = dict(zip(STATS, s))
            ce = v["ce_sum"] / max(v["n1"], 1)
            mtp = v["mtp_sum"] / max(v["n2"], 1)
            lb, z = v["lb_sum"] / v["n_mb"], v["z_sum"] / v["n_mb"]
            loss = objective({"ce": ce, "lb": lb, "z": z, **({"mtp": mtp} if v["n2"] else {})}, weights)
            rec = {"step": r.step, "tokens": r.tokens, "lr": r.lr, "phase": r.phase, "loss": loss, "ce": ce,
                   "mtp": mtp, "lb": lb, "z": z, "grad_norm": gn, "skipped": r.skipped}
            if r.counts_LE is not None:
                rec.update(expert_load(r.counts_LE.cpu()))
            out.append(rec)
        self.pending.clear()
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "bad_streak": self.bad_streak,
                "skipped_total": self.skipped_total}

    def load_state_dict(self, s: dict) -> None:
        self.step, self.tokens = int(s["step"]), int(s["tokens"])
        self.bad_streak, self.skipped_total = int(s["bad_streak"]), int(s["skipped_total"])
