"""Fast paths that exist only for speed, and `install`, the one place that gives them to a model.

  cpu_attention.py  bf16 CPU training attention: SDPA's flash forward, a blocked FlashAttention-2
                    backward (reference: SDPA's own backward)
  cpu_experts.py    the experts' grouped matmul parallel over experts, a small C++ extension
                    (reference: torch's F.grouped_mm, equal bit for bit)
  compiled.py       `CompiledOrEager`: a kernel written in plain torch, compiled on first use and
                    run eagerly where compiling fails (the attention backward, the LM head's loss
                    chunks, Muon's update, gradient clipping)

A model as built runs the reference paths. `install(model)` selects the fast ones for it, once, by
setting the slots the model leaves for them: `Attention.kernel` (None: SDPA), `Attention.fuse_qkv`
(q, k and v from one matmul in training) and `Experts.gmm` (the grouped matmul). Modules are found by
those slots, so this package imports nothing from the model (model/head_loss.py uses compiled.py). The trainer's
`parallelize()` calls it (after FP8, which brings its own matmuls), and so does `mellum2 train-mtp`.
Conditions that depend on the inputs (CPU, bf16, gradients needed) are checked by each kernel per
call; it returns to the reference where it does not apply. docs/model.md has the table of every
fast path, its reference, who selects it and the test that proves them equal.

MELLUM2_CPU_ATTENTION=sdpa (read here, at install) keeps SDPA's backward on a CPU.
"""
from __future__ import annotations

import os

import torch.nn.functional as F
from torch import nn

from . import cpu_attention, cpu_experts

ATTENTION = ("auto", "sdpa")


def install(model: nn.Module, *, attention: str | None = None, experts: bool = True, fuse_qkv: bool = True) -> dict:
    """Give `model`'s modules the fast paths (see the module docstring); returns what was installed.

    attention: "auto" (the CPU training attention, which runs where it applies) or "sdpa" (keep SDPA);
    default: $MELLUM2_CPU_ATTENTION, else "auto". experts: on a CPU, the experts' matmul parallel over
    experts where they use torch's grouped_mm and the C++ extension builds. fuse_qkv: one q/k/v matmul
    in training."""
    attention = (attention or os.environ.get("MELLUM2_CPU_ATTENTION", "").strip().lower() or "auto")
    if attention not in ATTENTION:
        raise ValueError(f"kernels.install: attention must be one of {ATTENTION}, got {attention!r}")
    attn = [m for m in model.modules() if hasattr(m, "kernel") and hasattr(m, "fuse_qkv")]  # model.layers.Attention
    for m in attn:
        m.kernel = cpu_attention.training_attention if attention == "auto" else None
        m.fuse_qkv = fuse_qkv
    done = {"cpu_attention": attention == "auto" and bool(attn), "fuse_qkv": fuse_qkv and bool(attn)}
    if experts and any(p.device.type == "cpu" for p in model.parameters()):
        done["cpu_experts"] = _cpu_experts(model)
    return done


def _cpu_experts(model: nn.Module) -> bool:
    """cpu_experts.grouped_mm for the experts that use torch's grouped_mm (not FP8's); False, keeping
    grouped_mm, where the C++ extension cannot be built."""
    experts = [m for m in model.modules() if getattr(m, "gmm", None) is F.grouped_mm]  # model.moe.Experts
    if not experts or not cpu_experts.load():
        return False
    for m in experts:
        m.gmm = cpu_experts.grouped_mm
    return True
