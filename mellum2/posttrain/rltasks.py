"""The embedded RL tasks: prompts with programmatic checks (no reward model), with a held-out split.

    rl_tasks(split="train", kinds=None, n=None, seed=0, difficulty=None) -> list of task dicts

Every task has
    "id"          unique within one call, deterministic
    "kind"        "math" | "code" | "json" | "tool"
    "messages"    the prompt conversation (OpenAI shape, ends with the user turn)
    "difficulty"  1 (a tiny model can learn it: one-digit sums, a JSON object with one dictated key,
                  "use the calculator to compute 12 + 7" with only the calculator offered, one-line
                  functions), 2, or 3 (multi-step problems, recursion and classes, nested JSON,
                  several tool calls in one turn)
    "reference"   an assistant message (OpenAI shape) that the verifier must score 1.0
and what its verifier needs:
    math  "answer": the exact value ("7", "-3", "7/2", "12.50"), compared with math-verify against the
          answer extracted from the reply's last line "The answer is <answer>." (mathtasks.extract_answer)
    code  "test_style": "assert" - "tests": snippets run after the reply's code in one namespace,
                        "entry_point": the function or class name
          "test_style": "stdio"  - "tests": [{"stdin", "stdout"}], the reply's program run once per case;
                        stdout compared after codeprogs.normalise_stdout (trailing spaces/newlines ignored)
          the code is the reply's (last) ```python block
    json  "schema": a JSON Schema (draft 2020-12) the reply content must satisfy, after
          jsontasks.strip_fence (an optional ```json fence); the schema pins every stated value
    tool  "tools": the offered tools; "expected_calls": [{"name", "arguments"}], compared with the reply's
          tool calls as a multiset (order-insensitive: "ordered": False); "match": {tool: {argument:
          rule}} with rule "value" (calculator expressions compared by their value, tools.calculate),
          "text" (trimmed, whitespace-collapsed, case-folded) or "exact" (JSON equality);
          sfteval.calls_match implements exactly this

difficulty: None mixes levels 1 / 2 / 3 as 4:4:2 (per task, seeded); an int or a collection of ints
restricts to those levels. kinds: any subset, shared equally; the list is shuffled (seeded). Defaults: 2000 train / 200 held-out.
Held-out tasks never share a key (template + constants) with train tasks (splits.py).
"""
from __future__ import annotations

import json
import random
from typing import Iterable

from . import codetasks, jsontasks, mathtasks, tooldialogs
from .sftdata import apportion
from .splits import check_split, draw, rng, stable_id

KINDS = ("math", "code", "json", "tool")
DEFAULT_N = {"train": 2000, "heldout": 200}
LEVEL_WEIGHTS = (4, 4, 2)


def _message(content: str = "", calls: list | None = None) -> dict:
    m = {"role": "assistant", "content": content}
    if calls:
        m["tool_calls"] = calls
    return m


def math_task(split: str, seed: int, i: int, level: int) -> tuple[str, dict]:
    p = mathtasks.math_problem(split, seed, i, difficulty=level, stream="rl-math")
    steps = "\n".join(p.steps)
    return p.key, {"messages": [{"role": "user", "content": f"{p.statement}\n{mathtasks.ANSWER_INSTRUCTION}"}],
                   "answer": p.value, "answer_text": p.answer,
                   "reference": _message(f"{steps}\n\n{mathtasks.final_line(p.value)}")}


def code_task(split: str, seed: int, i: int, level: int) -> tuple[str, dict]:
    spec = codetasks.code_spec(split, seed, i, difficulty=level, stream="rl-code")
    task = codetasks.rl_task(spec, rng(seed, split, "rl-code-prompt", i))
    task["reference"] = _message(task["reference"])
    task["spec"] = spec  # removed after the batch check
    return spec.key, task


def json_task(split: str, seed: int, i: int, level: int) -> tuple[str, dict]:
    t = jsontasks.json_task(split, seed, i, difficulty=level, stream="rl-json")
    return t.key, {"messages": [{"role": "user", "content": t.request}], "schema": t.schema,
                   "reference": _message(json.dumps(t.reference, ensure_ascii=False))}


def tool_task(split: str, seed: int, i: int, level: int) -> tuple[str, dict]:
    r = rng(seed, split, "rl-tool", i)
    gen = {1: lambda q: tooldialogs.calc_single(q, small=True),
           2: lambda q: (tooldialogs.calc_single if q.random() < 0.5 else tooldialogs.lookup_single)(q),
           3: tooldialogs.multi}[level]
    d = draw(gen, lambda d: d.key, split, r)
    first = next(j for j, m in enumerate(d.messages) if m["role"] == "assistant")
    ref = d.messages[first]
    return d.key, {"messages": d.messages[:first], "tools": d.tools, "expected_calls": d.expect["tool_calls"],
                   "match": d.expect["match"], "ordered": False,
                   "reference": _message(ref["content"], ref["tool_calls"])}


MAKERS = {"math": math_task, "code": code_task, "json": json_task, "tool": tool_task}


def _levels(difficulty) -> tuple[int, ...]:
    if difficulty is None:
        return (1, 2, 3)
    levels = (difficulty,) if isinstance(difficulty, int) else tuple(difficulty)
    if not levels or any(d not in (1, 2, 3) for d in levels):
        raise ValueError(f"difficulty must be None, 1, 2, 3 or a collection of them, got {difficulty!r}")
    return levels


def rl_tasks(split: str = "train", kinds: Iterable[str] | None = None, n: int | None = None, seed: int = 0,
             difficulty=None, check: bool = True) -> list[dict]:
    """`n` tasks of `split` (see the module docstring). `check`: run every code reference against its
    hidden tests first (one child process; AssertionError on a failure)."""
    check_split(split)
    kinds = tuple(KINDS if kinds is None else kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    levels = _levels(difficulty)
    weights = [LEVEL_WEIGHTS[d - 1] for d in levels]
    n = DEFAULT_N[split] if n is None else n
    counts = apportion(n, [(k, 1) for k in kinds])
    tasks = []
    for kind in kinds:
        for i in range(counts[kind]):
            level = rng(seed, split, f"rl-level-{kind}", i).choices(levels, weights=weights)[0]
            key, task = MAKERS[kind](split, seed, i, level)
            tasks.append({**task, "id": stable_id(f"{seed}:{split}:{kind}:{i}:{key}", f"{kind}-"), "kind": kind,
                          "difficulty": level})
    if check:
        codetasks.check_specs([t["spec"] for t in tasks if "spec" in t])
    for t in tasks:
        t.pop("spec", None)
    random.Random(f"{seed}:{split}:rl-shuffle").shuffle(tasks)
    return tasks
