"""Tuning runs for the demo's pre-training: each candidate trains `tiny` from the same seed, then
its held-out bits per byte are measured (benchmarks/heldout_bpb.py) next to `xz -9e`.

    python benchmarks/demo_tuning.py --steps 80 --batch-size 4 --only report,code   # short comparison runs
    python benchmarks/demo_tuning.py --list                                          # the candidates

A candidate is a list of extra `mellum2 train` flags (CANDIDATES below). Runs go to
`--out/<name>`; a finished run (its final checkpoint present) is not trained again, only measured.
The CPU seconds of training (this process's children: user + system) are recorded next to the wall
time, since on a shared machine wall time says more about the neighbours than about the recipe.
Each result is appended to `--out/results.jsonl`; the table is printed at the end; last stdout line:
one JSON object (the results).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from mellum2.data.curriculum import PHASE_PRESETS

CODE_MIX = json.dumps([
    {"budget": 0.58, "mixture": {"web": 30, "code": 60, "math": 10}, "fim_rate": 0.5},
    {"budget": 0.26, "mixture": {"web": 20, "code": 70, "math": 10}, "fim_rate": 0.1},
    {"budget": 0.16, "mixture": {"web": 10, "code": 85, "math": 5}, "fim_rate": 0.5, "fim_code_only": True}])
CODE_MIX_LONG_DECAY = json.dumps([
    {"budget": 0.45, "mixture": {"web": 30, "code": 60, "math": 10}, "fim_rate": 0.5},
    {"budget": 0.20, "mixture": {"web": 20, "code": 70, "math": 10}, "fim_rate": 0.1},
    {"budget": 0.35, "mixture": {"web": 10, "code": 85, "math": 5}, "fim_rate": 0.5, "fim_code_only": True}])

CANDIDATES: dict[str, list[str]] = {
    "report": [],  # the report's curriculum and the preset's lr (3e-3): today's demo recipe
    "code": ["--phases", CODE_MIX],  # = --phases demo (mellum2/data/curriculum.py), what the demo now runs
    "code-lr6e-3": ["--phases", CODE_MIX, "--lr", "6e-3"],
    "code-lr1.5e-3": ["--phases", CODE_MIX, "--lr", "1.5e-3"],
    "code-decay35": ["--phases", CODE_MIX_LONG_DECAY],
    "code-mtp0.3": ["--phases", CODE_MIX, "--mtp-loss-weight", "0.3"],
}
assert [json.loads(CODE_MIX)[k]["mixture"] for k in range(3)] == [p.mixture for p in PHASE_PRESETS["demo"]]


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="a JSON file: {name: [train flags]} replacing CANDIDATES")
    ap.add_argument("--only", default=None, help="comma-separated candidate names (default: all)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--files", type=int, default=12, help="held-out files scored (benchmarks/heldout_bpb.py)")
    ap.add_argument("--out", default="runs/tuning")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per training run")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    cands = json.loads(Path(a.config).read_text()) if a.config else CANDIDATES
    if a.list:
        for k, v in cands.items():
            print(f"{k:16s} {' '.join(v)}")
        return 0
    names = a.only.split(",") if a.only else list(cands)
    unknown = [n for n in names if n not in cands]
    if unknown:
        sys.exit(f"--only: unknown candidate(s) {unknown}; known: {', '.join(cands)}")
    out, py, env = Path(a.out), sys.executable, dict(os.environ)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        run = out / f"{name}-s{a.steps}-b{a.batch_size}"
        base = ["--preset", "tiny", "--max-steps", str(a.steps), "--batch-size", str(a.batch_size),
                "--seq-len", str(a.seq_len), "--seed", str(a.seed), "--log-every", "10", "--samples", "0",
                "--no-progress", "--no-tensorboard", "--compile", "off", "--out", str(run)]
        t0, c0 = time.time(), cpu_children()
        done = (run / "checkpoints" / f"step_{a.steps:08d}").is_dir()
        if not done:
            r = subprocess.run([py, "-m", "mellum2.cli", "train", *base, *cands[name]], env=env,
                               timeout=a.timeout, capture_output=True, text=True)
            if r.returncode:
                print(f"{name}: training failed ({r.returncode}): {r.stderr.strip()[-400:]}", flush=True)
                continue
        wall, cpu = time.time() - t0, cpu_children() - c0
        r = subprocess.run([py, str(Path(__file__).with_name("heldout_bpb.py")), "--model", str(run),
                            "--files", str(a.files), "--quiet"], env=env, capture_output=True, text=True)
        if r.returncode:
            print(f"{name}: bpb failed: {r.stderr.strip()[-400:]}", flush=True)
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        last = recs[-5:]
        res = {"name": name, "flags": cands[name], "steps": a.steps, "batch_size": a.batch_size,
               "tokens": a.steps * a.batch_size * a.seq_len, "train_ce_last5": sum(x["ce"] for x in last) / len(last),
               "bpb": m["bpb"], "xz_bpb": m["xz_bpb"], "files": m["files"], "train_wall_s": wall if not done else None,
               "train_cpu_s": cpu if not done else None}
        results.append(res)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
        print(f"{name:16s} bpb {res['bpb']:.3f} (xz {res['xz_bpb']:.3f})  train CE {res['train_ce_last5']:.3f}  "
              f"cpu {res['train_cpu_s'] or 0:.0f} s  wall {res['train_wall_s'] or 0:.0f} s", flush=True)
    print("\n| run | steps x batch | held-out bpb | xz -9e | train CE (last 5) | train CPU s |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['steps']} x {r['batch_size']} | {r['bpb']:.3f} | {r['xz_bpb']:.3f} | "
              f"{r['train_ce_last5']:.3f} | {r['train_cpu_s'] or 0:.0f} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
