"""Warmup-Hold-Decay learning-rate schedule driven by the curriculum's phase boundaries.

Mellum 2 (docs/mellum2.md §3): linear warmup (2000 steps to 3e-4), hold through phases 1-2,
linear decay to exactly 0 over phase 3. The schedule is a pure function of the step index, so a
resumed run recomputes the same learning rate from the step alone (nothing accumulates in floats),
and the trainer hands it to the optimisers as a plain number each step (the optimiser step is not
compiled, so nothing recompiles when it changes; `lr_tensor` gives a 0-d tensor for code that is).

Phase boundaries arrive in tokens (the loader's `phase_boundaries`: where phases 2 and 3 start and
where the run ends) and are turned into steps with the global tokens per step. Step s uses the lr at
the tokens consumed *before* it: warmup factor (s + 1) / warmup so step 0 already learns; decay
lr(s) = peak (end - s) / (end - decay_start), which is exactly 0 at the end boundary (after the last
step) and peak / (end - decay_start) on the last step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupHoldDecay:
    peak_lr: float
    warmup_steps: int
    decay_start: int  # first step of phase 3
    total_steps: int  # the end boundary (the number of steps)

    def __post_init__(self):
        if not self.peak_lr >= 0:
            raise ValueError(f"WarmupHoldDecay.peak_lr: expected >= 0, got {self.peak_lr}")
        if not 0 <= self.warmup_steps:
            raise ValueError(f"WarmupHoldDecay.warmup_steps: expected >= 0, got {self.warmup_steps}")
        if not 0 <= self.decay_start <= self.total_steps:
            raise ValueError(f"WarmupHoldDecay.decay_start: expected 0..total_steps={self.total_steps}, "
                             f"got {self.decay_start}")

    @classmethod
    def from_phase_boundaries(cls, peak_lr: float, warmup_steps: int, boundaries_tokens,
                              tokens_per_step: int) -> "WarmupHoldDecay":
        """boundaries_tokens: (phase-2 start, phase-3 start, end) in tokens, as the loader reports them."""
        b = list(boundaries_tokens)
        if len(b) != 3 or not (0 <= b[0] <= b[1] <= b[2]):
            raise ValueError(f"phase boundaries: expected 3 non-decreasing token counts "
                             f"(phase 2 start, phase 3 start, end), got {b}")
        if tokens_per_step <= 0:
            raise ValueError(f"tokens_per_step: expected > 0, got {tokens_per_step}")
        total = b[2] // tokens_per_step
        decay_start = min(total, -(-b[1] // tokens_per_step))  # first step whose tokens lie in phase 3
        return cls(peak_lr, warmup_steps, decay_start, total)

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return 0.0
        lr = self.peak_lr
        if self.warmup_steps and step < self.warmup_steps:
            lr = lr * (step + 1) / self.warmup_steps
        if step >= self.decay_start:
            lr = min(lr, self.peak_lr * (self.total_steps - step) / (self.total_steps - self.decay_start))
        return lr

    def lr_tensor(self, step: int, device=None) -> torch.Tensor:
        return torch.tensor(self(step), dtype=torch.float64, device=device)

    def state_dict(self) -> dict:
        return dict(peak_lr=self.peak_lr, warmup_steps=self.warmup_steps, decay_start=self.decay_start,
                    total_steps=self.total_steps)
