"""Verifiable coding tasks: drawing them per split, checking every solution, and turning them into SFT
conversations and RL tasks.

Tasks come from the templates in codebank.py / codebank_more.py (functions, assert tests) and
codeprogs.py (classes, and stdin/stdout programs). `check_specs` runs every solution against its tests
in one child interpreter (`python -I`, a fresh namespace per task, a per-task alarm and an overall
timeout): the code is our own generated, trusted code, so no sandbox is needed here; a failing
solution is a bug in a template and raises AssertionError naming the task.
"""
from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
import tempfile
from typing import Sequence, Union

from . import codebank, codebank_more, codeprogs
from .codebank import CodeSpec
from .codeprogs import StdioSpec
from .splits import draw, rng, stable_id

Spec = Union[CodeSpec, StdioSpec]
TEMPLATES: dict[int, tuple] = {
    1: codebank.FUNCTIONS_EASY + tuple(p for p in codeprogs.PROGRAMS if p.__name__ in ("line_op", "binop", "triangle")),
    2: codebank.FUNCTIONS_STRING + codebank.FUNCTIONS_LIST + codebank_more.FUNCTIONS_DICT + codebank_more.FUNCTIONS_MATH
       + tuple(p for p in codeprogs.PROGRAMS if p.__name__ not in ("line_op", "binop", "triangle")),
    3: codebank_more.FUNCTIONS_RECURSION + codeprogs.CLASSES,
}
# the child interpreter: runs each job in a fresh namespace under an alarm, prints one JSON list
_RUNNER = r"""
import contextlib, io, json, signal, sys
def _alarm(*_):
    raise TimeoutError("timed out")
signal.signal(signal.SIGALRM, _alarm)
jobs, per_job = json.load(sys.stdin)
out = []
for job in jobs:
    try:
        signal.alarm(per_job)
        if "stdio" in job:
            for k, (stdin, want) in enumerate(job["stdio"]):
                buf, sys.stdin = io.StringIO(), io.StringIO(stdin)
                with contextlib.redirect_stdout(buf):
                    exec(compile(job["code"], "<solution>", "exec"), {"__name__": "__main__"})
                norm = lambda t: "\n".join(l.rstrip() for l in t.rstrip().splitlines())
                if norm(buf.getvalue()) != norm(want):
                    raise AssertionError(f"case {k}: printed {buf.getvalue()!r}, expected {want!r}")
        else:
            ns = {"__name__": "__task__"}
            exec(compile(job["code"], "<solution>", "exec"), ns)
            for k, test in enumerate(job["tests"]):
                exec(compile(test, f"<test {k}>", "exec"), ns)
        signal.alarm(0)
        out.append(None)
    except BaseException as e:
        signal.alarm(0)
        out.append(f"{type(e).__name__}: {e}")
sys.stdout = sys.__stdout__
print(json.dumps(out))
"""


def _job(spec: Spec) -> dict:
    if isinstance(spec, StdioSpec):
        return {"code": spec.solution, "stdio": [list(c) for c in spec.cases]}
    return {"code": spec.solution, "tests": list(spec.tests)}


def run_jobs(jobs: Sequence[dict], per_job_s: int = 3, timeout_s: float = 120.0) -> list[str | None]:
    """Run {"code", "tests"} / {"code", "stdio": [[stdin, stdout], ...]} jobs in one child interpreter;
    None for a pass, else the error. For trusted generated code only (no isolation beyond a process)."""
    if not jobs:
        return []
    with tempfile.TemporaryDirectory(prefix="mellum2-check-") as tmp:
        proc = subprocess.run([sys.executable, "-I", "-c", _RUNNER], input=json.dumps([list(jobs), per_job_s]),
                              capture_output=True, text=True, timeout=timeout_s, cwd=tmp)
    if proc.returncode != 0:
        raise RuntimeError(f"solution checker exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@functools.lru_cache(maxsize=64)
def _check_cached(jobs_json: str) -> tuple:
    return tuple(run_jobs(json.loads(jobs_json)))


def check_specs(specs: Sequence[Spec]) -> None:
    """Every solution passes its own tests, or AssertionError naming the failing tasks."""
    uniq = {s.key + s.solution + repr(getattr(s, "tests", getattr(s, "cases", None))): s for s in specs}
    items = list(uniq.values())
    results = _check_cached(json.dumps([_job(s) for s in items]))
    bad = [f"{s.key}: {err}\n{s.solution}" for s, err in zip(items, results) if err]
    if bad:
        raise AssertionError(f"{len(bad)} generated solutions fail their tests:\n" + "\n".join(bad[:5]))


def code_spec(split: str, seed: int, index: int, difficulty: int | None = None, stream: str = "code") -> Spec:
    """Task `index` of a stream: a template drawn by difficulty (None: 1, 2, 3 in 2:5:3), its key in `split`."""
    r = rng(seed, split, stream, index)
    level = difficulty or r.choices((1, 2, 3), weights=(2, 5, 3))[0]
    pool = TEMPLATES[level]
    return draw(lambda q: q.choice(pool)(q), lambda s: s.key, split, r)


def signature_text(spec: CodeSpec) -> str:
    return spec.signature.removeprefix("def ").removesuffix(":")


def prompt(spec: Spec, r: random.Random, examples: bool = True) -> str:
    """The user's request. `examples=False` for RL, where the tests are hidden."""
    if isinstance(spec, StdioSpec):
        text = r.choice([f"Write a Python program. {spec.doc}", f"{spec.doc} Write the program in Python.",
                         f"Python program, please: {spec.doc}"])
        if examples and r.random() < 0.5:
            stdin, stdout = spec.cases[0]
            text += f"\n\nFor example, for the input\n```\n{stdin}```\nit prints\n```\n{stdout}```"
        return text
    if spec.signature.startswith("class "):
        return r.choice([spec.doc, f"In Python: {spec.doc}", f"{spec.doc} Use Python."])
    sig = signature_text(spec)
    docstring = spec.doc.replace("`", "")
    text = r.choice([f"Write a Python function `{sig}`. {spec.doc}",
                     f"Complete this function:\n\n```python\n{spec.signature}\n    \"\"\"{docstring}\"\"\"\n```",
                     f"Implement `{sig}` in Python: {spec.doc}",
                     f"I need a Python function `{sig}` for this: {spec.doc}"])
    if examples and r.random() < 0.4:
        text += f"\n\nFor example, `{spec.example[0]}` should return `{spec.example[1]}`."
    return text


def answer(spec: Spec, r: random.Random) -> str:
    """The assistant's reply: the code in a python block, sometimes with a one-line explanation."""
    block = f"```python\n{spec.solution}```"
    style = r.random()
    if style < 0.35:
        return f"{spec.explain}\n\n{block}"
    if style < 0.6:
        return f"{block}\n\n{spec.explain}"
    return block


def reasoning(spec: Spec) -> str:
    if isinstance(spec, StdioSpec):
        stdin, stdout = spec.cases[0]
        return (f"The program must do this: {spec.doc}\n{spec.explain}\nCheck: for the input {stdin!r} it should "
                f"print {stdout!r}.")
    if spec.signature.startswith("class "):
        return f"{spec.doc}\n{spec.explain} Each method only touches the stored state."
    return (f"The function {spec.name} must do this: {spec.doc.replace('`', '')}\n{spec.explain}\n"
            f"Check: {spec.example[0]} should return {spec.example[1]}.")


def conversation(spec: Spec, r: random.Random) -> dict:
    """An SFT conversation (both modes: reasoning is dropped later for Instruct)."""
    msgs = []
    if r.random() < 0.3:
        msgs.append({"role": "system", "content": r.choice([
            "You are a helpful coding assistant.", "You write correct, idiomatic Python.",
            "Answer with working code."])})
    msgs.append({"role": "user", "content": prompt(spec, r)})
    msgs.append({"role": "assistant", "content": answer(spec, r), "reasoning_content": reasoning(spec)})
    return {"messages": msgs, "source": "code", "id": stable_id(spec.key + str(r.random()), "code-")}


def rl_task(spec: Spec, r: random.Random) -> dict:
    """An RL task: the request, the hidden tests, and a reference reply that passes them."""
    task = {"id": stable_id(spec.key + spec.solution, "code-"), "kind": "code",
            "messages": [{"role": "user", "content": prompt(spec, r, examples=False)}],
            "reference": f"```python\n{spec.solution}```", "difficulty": spec.difficulty, "template": spec.template}
    if isinstance(spec, StdioSpec):
        task.update(test_style="stdio", tests=[{"stdin": i, "stdout": o} for i, o in spec.cases], entry_point=None)
    else:
        task.update(test_style="assert", tests=list(spec.tests), entry_point=spec.name)
    return task
