"""Exact resume: a run SIGKILLed at arbitrary moments and resumed reaches, bit for bit, the losses and
final weights of an uninterrupted run (CPU, one thread, subprocesses like a real crash)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train_utils import ROOT, cli

ARGS = ["--preset", "test-small", "--data", "synthetic", "--max-steps", "24", "--batch-size", "2",
        "--seq-len", "48", "--save-every", "4", "--keep", "2", "--log-every", "3", "--no-progress",
        "--samples", "0", "--peak-tflops", "1", "--no-tensorboard"]


def _losses(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _kill_at_random_moment(out, rng, after_ckpts: int):
    """Start the run (resuming if there is a checkpoint) and SIGKILL it at a random moment once it has
    written `after_ckpts` more checkpoints, or let it finish if it gets there first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    resume = ["--resume"] if (out / "checkpoints").exists() and any((out / "checkpoints").glob("step_*")) else []
    seen = set((out / "checkpoints").glob("step_*")) if resume else set()
    p = subprocess.Popen([sys.executable, "-m", "mellum2.train.pretrain", *ARGS, "--out", str(out), *resume],
                         env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        now = set((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else set()
        if len(now - seen) >= after_ckpts:
            delay = rng.uniform(0.0, 0.4)  # mid-step, mid-log or mid-checkpoint
            print(f"SIGKILL {delay:.3f}s after checkpoint {sorted(now - seen)[-1].name}")
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.005)
    assert p.returncode == 0, p.stderr.read().decode()[-2000:]
    return False


def test_sigkill_and_resume_is_bit_exact(tmp_path):
    ref = tmp_path / "ref"
    cli(*ARGS, "--out", ref)
    out = tmp_path / "killed"
    rng = random.Random()  # arbitrary moments; the delays are in the failure message
    kills = 0
    for _ in range(2):
        kills += _kill_at_random_moment(out, rng, after_ckpts=1)
    cli(*ARGS, "--out", out, "--resume")  # finish
    assert kills >= 1
    assert _losses(out) == _losses(ref)  # every step's loss and grad norm, as exact floats
    a = load_file(ref / "checkpoints" / "step_00000024" / "model" / "model.safetensors")
    b = load_file(out / "checkpoints" / "step_00000024" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(ref / "checkpoints" / "step_00000024" / "train_state.pt", weights_only=True)
    sb = torch.load(out / "checkpoints" / "step_00000024" / "train_state.pt", weights_only=True)
    for k, v in sa["optim"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, sb["optim"]["state"][k][name]), (k, name)
    assert sa["loader"] == sb["loader"] and sa["trainer"] == sb["trainer"]


@pytest.mark.slow
def test_sigkill_many_times(tmp_path):
    """Five kills at random moments (up to ~2 min)."""
    ref = tmp_path / "ref"
    cli(*ARGS, "--out", ref)
    out = tmp_path / "killed"
    rng = random.Random()
    for _ in range(5):
        _kill_at_random_moment(out, rng, after_ckpts=1)
    cli(*ARGS, "--out", out, "--resume")
    assert _losses(out) == _losses(ref)
