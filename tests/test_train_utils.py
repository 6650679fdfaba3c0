"""Shared helpers for the training tests: a short in-process run of the Trainer on synthetic data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.train.data import SyntheticLoader
from mellum2.train.optim import build_optimizers
from mellum2.train.parallel import Dist, install_count_reducer, parallelize
from mellum2.train.schedule import WarmupHoldDecay
from mellum2.train.trainer import Trainer


ROOT = Path(__file__).resolve().parents[1]



def cli(*args, timeout=600, check=True, **popen) -> subprocess.CompletedProcess:
    """`python -m mellum2.train.pretrain ARGS` in a subprocess, one thread, quiet."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mellum2.train.pretrain", *map(str, args)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def make_trainer(preset="test-small", steps=20, batch_size=4, seq_len=32, grad_accum=1, lr=3e-3, fp8=False,
                 ac=False, compile=False, precision="bf16", seed=0, max_bad_steps=5, model=None):
    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(seed)
    model = model or Mellum2(cfg)
    d = Dist()
    parallelize(model, d, fp8=fp8, ac=ac, compile=compile, precision=precision)
    tap = install_count_reducer(model, d)
    tps = batch_size * seq_len * grad_accum
    loader = SyntheticLoader(batch_size=batch_size, seq_len=seq_len, total_tokens=steps * tps,
                             vocab_size=cfg.vocab_size, seed=seed)
    sched = WarmupHoldDecay.from_phase_boundaries(lr, 2, loader.phase_boundaries, tps)
    return Trainer(model, build_optimizers(model, lr), sched, loader, d, grad_accum=grad_accum,
                   precision=precision, max_bad_steps=max_bad_steps, tap=tap)


def train_records(steps=20, **kw) -> list[dict]:
    tr = make_trainer(steps=steps, **kw)
    for _ in range(steps):
        tr.train_step()
    return tr.drain()


def train_losses(preset="test-small", steps=20, **kw) -> list[float]:
    return [r["loss"] for r in train_records(steps=steps, preset=preset, **kw)]
