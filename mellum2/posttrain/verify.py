"""Verifiers for RL with verifiable rewards: a task and a reply in, `(reward in [0, 1], reason)` out.

`score(task, reply)` dispatches on `task["kind"]`. A task is a plain dict:

| kind   | fields                                                                                      |
|--------|---------------------------------------------------------------------------------------------|
| "math" | `answer`: the reference (str or number; LaTeX or plain: "1/2", "\\frac{1}{2}", "0.5", "2x+1") |
| "code" | `tests`: a test program (str: asserts, or `def check(candidate)` with `entry_point`), or a list |
|        | of assert snippets (str), or a list of `{"stdin", "stdout"}` cases; optional `entry_point`,   |
|        | `timeout_s` (default 5, per program), `memory_mb` (512), `partial` (False: all tests or 0)   |
| "json" | `schema`: a JSON Schema; the reply must be JSON valid against it                               |
| "tool" | `expected_calls`: `[{"name", "arguments": {...}}]`; `ordered` (default False: any order)      |

`reply` is the parsed assistant message (`{"content", "reasoning_content", "tool_calls", "errors"}`,
OpenAI-shaped, as `mellum2.chat.parse` returns it) or the model's raw text, which is parsed with
`mellum2.chat.parse` first (pass the message instead where the prompt opened the think span); math,
code and json read its `content` (reasoning is never scored), tool reads its `tool_calls`.

Extraction rules. Code: the last fenced block tagged python (py, python3), else the last untagged
fenced block, else the whole reply; an unclosed python fence (a truncated reply) runs to the end.
Math: the last `\\boxed{...}` (or `\\fbox`), else the last "answer is X" / "answer: X" (to the end
of its line or sentence, without `$` or `**`), else the last number in the reply (1,000, -2.5, 3/4).
Equivalence is math-verify's (`parse` of the LaTeX-wrapped answer, then `verify(gold, answer)`), so
1/2, 0.5, \\frac{1}{2} and 2/4 agree, as do 2x+1 and 1+2x; its parsing timeout uses SIGALRM, which
only the main thread has, so in other threads it runs without one. JSON: the last ```json block,
else the last untagged fenced block, else the whole reply; validated with `jsonschema` (the schema's own draft).

Rewards are binary except code with `partial: true` (fraction of tests passed). A reply that cannot
be scored (no code, no answer, bad JSON, malformed tool calls) gets 0 and the error as the reason.
Code runs in `mellum2.sandbox`: a run whose sandbox failed transiently is retried there, and one that
keeps failing raises `SandboxError` (the reply is not scored, not given 0). A code test program
passes only if it reaches its end: the harness prints a per-run random marker after the last test,
so a reply that exits early (`sys.exit(0)`, `os._exit(0)`) does not pass. A malformed task raises
UsageError naming the field.
"""
from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Mapping

from mellum2.chat import parse as parse_chat
from mellum2.errors import UsageError
from mellum2.sandbox import run_many

KINDS = ("math", "code", "json", "tool")
CODE_TIMEOUT_S = 5.0
CODE_MEMORY_MB = 512
MAX_ANSWER_CHARS = 1000

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)
_OPEN_PY = re.compile(r"```[ \t]*(?:python3?|py)[^\n]*\n(.*)\Z", re.S)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.I)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def score(task: Mapping, reply: str | Mapping) -> tuple[float, str]:
    """Reward in [0, 1] and a one-line reason for `reply` to `task` (fields: module docstring)."""
    kind = _field(task, "kind")
    if kind == "math":
        return score_math(_content(reply), _field(task, "answer"))
    if kind == "code":
        return score_code(_content(reply), _field(task, "tests"), entry_point=task.get("entry_point"),
                          timeout_s=task.get("timeout_s", CODE_TIMEOUT_S),
                          memory_mb=task.get("memory_mb", CODE_MEMORY_MB), partial=task.get("partial", False))
    if kind == "json":
        return score_json(_content(reply), _field(task, "schema"))
    if kind == "tool":
        return score_tool(reply, _field(task, "expected_calls"), ordered=task.get("ordered", False))
    raise UsageError(f"task kind {kind!r}: expected one of {', '.join(KINDS)}")


def _field(task: Mapping, name: str):
    if not isinstance(task, Mapping) or name not in task:
        raise UsageError(f"task {str(task)[:80]}: missing field {name!r}")
    return task[name]


def _message(reply: str | Mapping) -> Mapping:
    return reply if isinstance(reply, Mapping) else parse_chat(reply)


def _content(reply: str | Mapping) -> str:
    return _message(reply).get("content") or ""


# --- code -----------------------------------------------------------------------------------------

def extract_code(text: str) -> str:
    """The program in a reply (rule in the module docstring)."""
    blocks = _FENCE.findall(text)
    tagged = [body for tag, body in blocks if tag.lower() in ("python", "py", "python3")]
    if tagged:
        return tagged[-1]
    untagged = [body for tag, body in blocks if not tag]
    if untagged:
        return untagged[-1]
    if m := _OPEN_PY.search(text):
        return m.group(1)
    return text if "```" not in text else ""


def score_code(reply: str, tests, *, entry_point: str | None = None, timeout_s: float = CODE_TIMEOUT_S,
               memory_mb: int = CODE_MEMORY_MB, partial: bool = False) -> tuple[float, str]:
    code = extract_code(reply)
    if not code.strip():
        return 0.0, "no code in the reply"
    if isinstance(tests, str):
        tests = [tests + (f"\ncheck({entry_point})\n" if entry_point else "")]
    if not isinstance(tests, list) or not tests:
        raise UsageError("task field 'tests': expected a test program, a list of asserts or of {stdin, stdout}")
    if all(isinstance(t, Mapping) for t in tests):
        return _io_tests(code, tests, timeout_s, memory_mb, partial)
    if not all(isinstance(t, str) for t in tests):
        raise UsageError("task field 'tests': mixes test programs and {stdin, stdout} cases")
    nonce = secrets.token_hex(16)
    (r,) = run_many([{"code": code + _harness(tests, nonce), "timeout_s": timeout_s, "memory_mb": memory_mb}])
    last = r.stdout.rstrip("\n").rsplit("\n", 1)[-1].split()
    if r.status != "ok" or len(last) != 3 or last[0] != nonce:
        why = _failure(r) if r.status != "ok" else "the program exited before its tests finished"
        return 0.0, why
    passed, total = int(last[1]), int(last[2])
    failures = [line for line in r.stderr.splitlines() if line.startswith("test ")]
    reason = f"{passed}/{total} tests passed" + (f"; {failures[0]}" if failures else "")
    return (passed / total if partial else float(passed == total)), reason


def _harness(tests: list[str], nonce: str) -> str:
    """Runs each test in the program's globals, counts the passes, prints the marker line last."""
    return (
        "\n\n# tests appended by the verifier\n"
        f"def __verify(tests={tests!r}):\n"
        "    import sys\n"
        "    passed = 0\n"
        "    for i, t in enumerate(tests):\n"
        "        try:\n"
        "            exec(t, globals())\n"
        "            passed += 1\n"
        "        except BaseException as e:\n"
        "            print(f'test {i} failed: {type(e).__name__}: {e}'[:300], file=sys.stderr)\n"
        "    sys.stdout.flush()\n"
        f"    print('\\n{nonce}', passed, len(tests))\n"
        "__verify()\n"
    )


def _io_tests(code, tests, timeout_s, memory_mb, partial) -> tuple[float, str]:
    for t in tests:
        if "stdout" not in t:
            raise UsageError(f"task field 'tests': the case {str(t)[:60]} has no 'stdout'")
    results = run_many([{"code": code, "stdin": t.get("stdin", ""), "timeout_s": timeout_s,
                         "memory_mb": memory_mb} for t in tests], workers=min(len(tests), 8))
    passed, first = 0, ""
    for i, (t, r) in enumerate(zip(tests, results)):
        if r.status == "ok" and _norm(r.stdout) == _norm(t["stdout"]):
            passed += 1
        elif not first:
            first = f"; case {i}: " + (_failure(r) if r.status != "ok" else "wrong output")
    reason = f"{passed}/{len(tests)} cases passed{first}"
    return (passed / len(tests) if partial else float(passed == len(tests))), reason


def _norm(text: str) -> list[str]:
    """Output compared line by line without trailing spaces and trailing blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _failure(r) -> str:
    if r.status == "error":
        tail = (r.stderr.strip().splitlines() or [f"exit status {r.exit_code}"])[-1]
        return f"error: {tail[:300]}"
    return {"timeout": f"timeout after {r.wall_s:.1f} s", "memory": "memory limit",
            "output_limit": "output limit", "killed": f"killed by signal {-r.exit_code}"}[r.status]


# --- math -----------------------------------------------------------------------------------------

def extract_answer(text: str) -> str | None:
    """The final answer in a reply (rule in the module docstring), or None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    found = _ANSWER_IS.findall(text)
    if found:
        answer = re.split(r"\.(?:\s|$)", found[-1].strip().strip("*").strip())[0]   # up to a sentence's end
        answer = answer.strip().strip("*").strip("$").strip()
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None   # unclosed: a truncated reply has no answer


def _math(expr: str) -> list:
    # heavy (sympy, ~0.5 s): imported on first use so that importing mellum2.posttrain stays cheap
    from math_verify import LatexExtractionConfig, parse as mv_parse

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return mv_parse(f"${expr}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout)


def score_math(reply: str, answer) -> tuple[float, str]:
    found = extract_answer(reply)
    if found is None:
        return 0.0, "no final answer found"
    if len(found) > MAX_ANSWER_CHARS:
        return 0.0, f"the final answer is longer than {MAX_ANSWER_CHARS} characters"
    gold, pred = _math(str(answer)), _math(found)
    if not gold:
        raise UsageError(f"task field 'answer': {answer!r} is not a mathematical expression")
    if not pred:
        return 0.0, f"cannot parse the final answer {found!r}"
    from math_verify import verify as mv_verify   # heavy, as in _math

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if mv_verify(gold, pred, timeout_seconds=timeout):
        return 1.0, f"{found!r} equals {str(answer)!r}"
    return 0.0, f"{found!r} differs from {str(answer)!r}"


# --- JSON -----------------------------------------------------------------------------------------

def score_json(reply: str, schema: Mapping) -> tuple[float, str]:
    import jsonschema   # ~0.15 s to import: on first use, as math_verify

    blocks = _FENCE.findall(reply)
    text = next((body for tag, body in reversed(blocks) if tag.lower() == "json"), None)
    text = text if text is not None else next((body for tag, body in reversed(blocks) if not tag), reply)
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UsageError(f"task field 'schema': not a valid JSON Schema: {e.message}") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return 0.0, f"invalid JSON: {e}"
    error = jsonschema.exceptions.best_match(cls(schema).iter_errors(value))
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "(root)"
        return 0.0, f"schema violation at {where}: {error.message[:300]}"
    return 1.0, "valid against the schema"


# --- tool calls -------------------------------------------------------------------------------------

def score_tool(reply: str | Mapping, expected: list, *, ordered: bool = False) -> tuple[float, str]:
    reply = _message(reply)
    if not isinstance(expected, list) or not all(isinstance(c, Mapping) and "name" in c for c in expected):
        raise UsageError("task field 'expected_calls': expected a list of {name, arguments}")
    if reply.get("errors"):
        return 0.0, "malformed tool call: " + "; ".join(map(str, reply["errors"]))[:300]
    calls = []
    for call in reply.get("tool_calls") or []:
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                return 0.0, f"arguments of {fn.get('name')!r} are not JSON: {e}"
        calls.append((fn.get("name"), args))
    want = [(c["name"], c.get("arguments", {})) for c in expected]
    if ordered:
        for i, (got, exp) in enumerate(zip(calls, want)):
            if got != exp:
                return 0.0, f"call {i}: got {_show(got)}, expected {_show(exp)}"
        if len(calls) != len(want):
            return 0.0, f"{len(calls)} calls, expected {len(want)}"
        return 1.0, f"{len(want)} calls match in order"
    left = list(calls)
    for exp in want:
        if exp not in left:
            near = [c for c in left if c[0] == exp[0]]
            return 0.0, (f"arguments differ: got {_show(near[0])}, expected {_show(exp)}" if near
                         else f"missing call {_show(exp)}")
        left.remove(exp)
    if left:
        return 0.0, f"unexpected call {_show(left[0])}"
    return 1.0, f"{len(want)} calls match"


def _show(call: tuple) -> str:
    return f"{call[0]}({json.dumps(call[1], sort_keys=True)[:200]})"
