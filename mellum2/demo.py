"""`make demo` / `mellum2 demo`: the end-to-end tour on this machine's CPU.

Steps (each a call into the stage's own module, nothing demo-specific hidden here):
  1. the `tiny` model: its accounting next to the released 12B's, and a forward pass.
"""
from __future__ import annotations

import argparse
import time

import torch

from .model import Mellum2, ModelConfig
from .model.info import print_report, report


def step_model() -> None:
    print("== 1. the model ==")
    for name in ("mellum2-12b", "tiny"):
        cfg = ModelConfig.from_preset(name)
        print_report(name, cfg, report(cfg))
        print()
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = Mellum2(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 512))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
        t = time.perf_counter()
        out = model(ids, labels=ids)
        dt = time.perf_counter() - t
    print(f"tiny forward, batch 8 x 512 (bf16 autocast): {dt:.3f} s, {8 * 512 / dt:,.0f} tok/s; "
          f"loss at init {out.loss.item():.3f} (ln V = {torch.tensor(cfg.vocab_size).log().item():.3f}); "
          + ", ".join(f"{k} {v.item():.3f}" for k, v in out.losses.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mellum2 demo", description=__doc__.split("\n\n")[0])
    ap.parse_args(argv)
    step_model()
    return 0
