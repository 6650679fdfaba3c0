"""Kill-and-corrupt soak of a training run directory: N SIGKILLs at random moments and M single-bit
flips in random checkpoint files, resuming after each, against one uninterrupted run of the same
arguments.

The peer here is the uninterrupted run: the soak passes when the interrupted run's final weights and
every step's loss are bit-identical to it, or when a run stops with one line naming the damaged file
(then the soak starts that run over, as a user would, and the final comparison still applies).
A silent divergence (different weights or losses with no message) is the one failure.

Each event, in a random order:
  kill   start (or `--resume`) the run, wait for its next checkpoint, SIGKILL it after a random delay
         of up to one checkpoint interval (mid-step, mid-log or mid-save)
  flip   with no process running, flip one random bit of one random file of a checkpoint (the newest
         with probability 3/4, else a random one); `checkpoint.validate` is asked at once whether
         the flip is detected (a flip of JSON whitespace in meta.json can leave its content
         unchanged: counted as `no_effect`)
then the run is resumed to the end. Outcomes: `fallbacks` (a resume named a damaged checkpoint and
went on from an older verified one), `clear_stops` (no verified checkpoint left: one line naming the
files), `identical` / `silent_divergence`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py --config tiny --kills 10 --flips 10

The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mellum2.train import checkpoint  # noqa: E402


def train_cmd(args, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "mellum2.train.pretrain", "--preset", args.config, "--data", "synthetic",
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--save-every", str(args.save_every), "--keep", str(args.keep), "--log-every", "1", "--no-progress",
            "--samples", "0", "--peak-tflops", "1", "--no-tensorboard", "--compile", "off", "--out", str(out),
            *(["--resume"] if resume else [])]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}


def run_to_end(args, out: Path, log: list[str]) -> subprocess.CompletedProcess:
    resume = bool(checkpoint.list_checkpoints(out))
    r = subprocess.run(train_cmd(args, out, resume), env=env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=3600)
    log.append(r.stdout + r.stderr)
    return r


def kill_once(args, out: Path, rng: random.Random, log: list[str], step_s: float) -> str:
    """Start/resume the run and SIGKILL it at a random moment after its next checkpoint."""
    resume = bool(checkpoint.list_checkpoints(out))
    seen = {p for _, p in checkpoint.list_checkpoints(out)}
    p = subprocess.Popen(train_cmd(args, out, resume), env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    while p.poll() is None:
        new = {q for _, q in checkpoint.list_checkpoints(out)} - seen
        if new:
            time.sleep(rng.uniform(0, args.save_every * step_s))
            p.send_signal(signal.SIGKILL)
            p.wait()
            log.append(p.stdout.read())
            return "killed"
        time.sleep(0.01)
    log.append(p.stdout.read())
    return "finished" if p.returncode == 0 else f"exit {p.returncode}"


def flip_once(out: Path, rng: random.Random) -> dict:
    found = checkpoint.list_checkpoints(out)
    if not found:
        return {"file": None, "outcome": "no checkpoint yet"}
    path = found[-1][1] if rng.random() < 0.75 else rng.choice(found)[1]
    files = sorted(f for f in path.rglob("*") if f.is_file())
    f = rng.choice(files)
    data = bytearray(f.read_bytes())
    off, bit = rng.randrange(len(data)), rng.randrange(8)
    data[off] ^= 1 << bit
    f.write_bytes(bytes(data))
    try:
        checkpoint.validate(path)
        outcome = "no_effect"
    except checkpoint.DamagedCheckpoint:
        outcome = "detected"
    return {"file": str(f.relative_to(out)), "offset": off, "bit": bit, "outcome": outcome}


def final_state(out: Path, steps: int):
    path = checkpoint.checkpoints_root(out) / checkpoint.step_dir_name(steps)
    w = load_file(path / "model" / "model.safetensors")
    losses = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    return w, losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny", help="model preset")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--flips", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="of the soak's choices (the training seed is fixed)")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mellum2-soak-"))
    ref, out = work / "ref", work / "soak"
    for d in (ref, out):
        shutil.rmtree(d, ignore_errors=True)
    log: list[str] = []
    t0 = time.perf_counter()
    r = run_to_end(args, ref, log)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-2000:])
        return 1
    step_s = (time.perf_counter() - t0) / args.steps  # an upper bound (start-up included)
    print(f"reference: {args.steps} steps in {time.perf_counter() - t0:.0f} s")

    events = ["kill"] * args.kills + ["flip"] * args.flips
    rng.shuffle(events)
    if "kill" in events:  # the first event is a kill, so the flips find a checkpoint to damage
        events.remove("kill")
        events.insert(0, "kill")
    counts = {"kills": 0, "kill_missed": 0, "flips": 0, "detected": 0, "no_effect": 0, "flip_skipped": 0,
              "fallbacks": 0, "clear_stops": 0, "restarts": 0}
    flips = []
    for ev in events:
        if ev == "kill":
            res = kill_once(args, out, rng, log, step_s)
            if res == "killed":
                counts["kills"] += 1
            else:
                counts["kill_missed"] += 1
            print(f"kill: {res}")
            if "no verified checkpoint in" in log[-1]:  # a clear stop: start the run over
                print(f"stopped: {log[-1].strip().splitlines()[-1]}")
                counts["restarts"] += 1
                shutil.rmtree(checkpoint.checkpoints_root(out))
        else:
            f = flip_once(out, rng)
            flips.append(f)
            if f["file"] is None:
                counts["flip_skipped"] += 1
            else:
                counts["flips"] += 1
                counts[f["outcome"]] += 1
            print(f"flip: {f}")
    for _ in range(3):  # to the end; a clear stop (nothing verifies) starts the run over, as a user would
        r = run_to_end(args, out, log)
        if r.returncode == 0:
            break
        line = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        print(f"stopped: {line}")
        if "no verified checkpoint" not in line:
            print(r.stderr[-3000:])
            return 1
        counts["restarts"] += 1
        shutil.rmtree(checkpoint.checkpoints_root(out))
    text = "\n".join(log)
    counts["fallbacks"] = text.count("the newest verified checkpoint")
    counts["clear_stops"] = text.count("no verified checkpoint in")
    wa, la = final_state(ref, args.steps)
    wb, lb = final_state(out, args.steps)
    identical = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and la == lb
    result = {"config": args.config, "steps": args.steps, "save_every": args.save_every, "keep": args.keep,
              "kills_requested": args.kills, "flips_requested": args.flips, **counts, "identical": identical,
              "silent_divergence": int(not identical), "seconds": round(time.perf_counter() - t0)}
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
