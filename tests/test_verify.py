"""Verifiers against hand-made replies: right, wrong, hanging and hostile code; equivalent math forms;
JSON schemas; tool calls in another order; transient sandbox failures retried, not scored."""
import json

import pytest

from mellum2.errors import UsageError
from mellum2.posttrain.verify import extract_answer, extract_code, score
from mellum2.sandbox import SandboxError, isolate, pool

needs_sandbox = pytest.mark.skipif(not isinstance(isolate._get("bwrap"), isolate.Backend),
                                   reason="bubblewrap is not installed")

ADD = {"kind": "code", "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]}


def fenced(code, tag="python"):
    return f"Here is the solution.\n\n```{tag}\n{code}\n```\n\nIt adds the numbers."


def test_extract_code():
    assert extract_code(fenced("x = 1")) == "x = 1\n"
    two = "```python\nfirst = 1\n```\nthen\n```py\nsecond = 2\n```\n```text\nnot code\n```"
    assert extract_code(two) == "second = 2\n"                       # the last python block
    assert extract_code("```\nplain = 1\n```") == "plain = 1\n"      # else the last untagged one
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"   # else the whole reply
    assert extract_code("text\n```python\ndef f():\n    return 1") == "def f():\n    return 1"  # unclosed


@needs_sandbox
def test_code_right_wrong_hanging_hostile():
    assert score(ADD, fenced("def add(a, b):\n    return a + b"))[0] == 1.0
    reward, reason = score(ADD, fenced("def add(a, b):\n    return a * b"))
    assert reward == 0.0 and reason.startswith("1/3 tests passed; test 0 failed: AssertionError")
    assert score(dict(ADD, partial=True), fenced("def add(a, b):\n    return a * b"))[0] == pytest.approx(1 / 3)
    reward, reason = score(dict(ADD, timeout_s=1), fenced("def add(a, b):\n    while True:\n        pass"))
    assert reward == 0.0 and reason.startswith("timeout")
    reward, reason = score(ADD, fenced("def add(a, b):\n    return a +"))
    assert reward == 0.0 and reason.startswith("error: SyntaxError")
    # exiting early with success is not a pass, at the top level or inside the tested function
    for cheat in ("import sys\nsys.exit(0)", "import os\nos._exit(0)",
                  "def add(a, b):\n    import os\n    os._exit(0)", "print('0 3 3')\nraise SystemExit"):
        reward, reason = score(ADD, fenced(cheat))
        assert reward == 0.0, (cheat, reason)
    hostile = "import os\nwhile True:\n    os.fork()"
    reward, reason = score(dict(ADD, timeout_s=1), fenced(hostile))
    assert reward == 0.0 and reason.startswith(("timeout", "error"))
    reward, reason = score(ADD, fenced("x = bytearray(1 << 40)\ndef add(a, b):\n    return a + b"))
    assert (reward, reason) == (0.0, "memory limit")
    assert score(ADD, "no code at all")[0] == 0.0
    assert score(ADD, "```python\n\n```") == (0.0, "no code in the reply")


@needs_sandbox
def test_code_humaneval_shape_and_message_dict():
    task = {"kind": "code", "entry_point": "incr",
            "tests": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n"}
    right = {"content": fenced("def incr(x):\n    return x + 1"), "reasoning_content": "```python\nbad\n```",
             "tool_calls": [], "errors": []}
    assert score(task, right) == (1.0, "1/1 tests passed")
    thinking = "<think>\n```python\ndef incr(x):\n    return x\n```\n</think>\n\n" + fenced("def incr(x):\n    return 1 + x")
    assert score(task, thinking)[0] == 1.0
    assert score(task, fenced("def incr(x):\n    return x"))[0] == 0.0


@needs_sandbox
def test_code_stdin_stdout_cases():
    task = {"kind": "code", "tests": [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "5 7", "stdout": "12"},
                                      {"stdin": "-4 4\n", "stdout": "0\n\n"}]}
    right = fenced("a, b = map(int, input().split())\nprint(a + b)  ")
    assert score(task, right) == (1.0, "3/3 cases passed")
    wrong = fenced("a, b = map(int, input().split())\nprint(a - b if a < 0 else a + b)")
    assert score(task, wrong) == (0.0, "2/3 cases passed; case 2: wrong output")
    assert score(dict(task, partial=True), wrong)[0] == pytest.approx(2 / 3)
    reward, reason = score(dict(task, timeout_s=1), fenced("input()\nwhile True:\n    pass"))
    assert reward == 0.0 and "case 0: timeout" in reason


@needs_sandbox
def test_transient_sandbox_failure_is_retried_not_scored(monkeypatch):
    real, calls = pool.run, []

    def flaky(code, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise SandboxError("bwrap: Creating new namespace failed: Resource temporarily unavailable", transient=True)
        return real(code, **kw)

    monkeypatch.setattr(pool, "run", flaky)
    assert score(ADD, fenced("def add(a, b):\n    return a + b"))[0] == 1.0 and len(calls) == 2

    def down(code, **kw):
        raise SandboxError("bwrap: Creating new namespace failed: Resource temporarily unavailable", transient=True)

    monkeypatch.setattr(pool, "run", down)
    monkeypatch.setattr(pool, "BACKOFF_S", 0.001)
    with pytest.raises(SandboxError):   # never turned into a 0 reward
        score(ADD, fenced("def add(a, b):\n    return a + b"))


def test_math_answer_extraction():
    assert extract_answer("so the result is \\boxed{\\frac{1}{2}}, i.e. 0.5") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{1} then \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_answer("The answer is $2x+1$.") == "2x+1"
    assert extract_answer("**Answer:** 3.5. That is all.") == "3.5"
    assert extract_answer("I counted 3 apples, then 1,000 more") == "1,000"
    assert extract_answer("no digits at all") is None
    assert extract_answer("\\boxed{unclosed") is None


@pytest.mark.parametrize("reply", ["The answer is 1/2.", "The answer is 0.5.", "\\boxed{\\frac{1}{2}}",
                                   "so we get $\\dfrac{2}{4}$, the answer is $\\frac12$", "x = 0.50",
                                   {"content": "\\boxed{0.5}", "reasoning_content": "maybe 3", "tool_calls": []}])
def test_math_equivalent_forms(reply):
    assert score({"kind": "math", "answer": "\\frac{1}{2}"}, reply)[0] == 1.0
    assert score({"kind": "math", "answer": 0.5}, reply)[0] == 1.0


def test_math_wrong_and_unscoreable():
    task = {"kind": "math", "answer": "1/3"}
    assert score(task, "The answer is 0.333.")[0] == 0.0          # not equal to 1/3 at math-verify's precision
    assert score(task, "\\boxed{2/6}")[0] == 1.0
    assert score({"kind": "math", "answer": "2x+1"}, "The answer is 1 + 2x.")[0] == 1.0
    assert score({"kind": "math", "answer": "(x-1)(x+1)"}, "\\boxed{x^2-1}")[0] == 1.0
    assert score({"kind": "math", "answer": "-3"}, "\\boxed{3}")[0] == 0.0
    assert score(task, "I do not know.") == (0.0, "no final answer found")
    assert score({"kind": "math", "answer": "1000"}, "The total is 1,000 apples")[0] == 1.0
    with pytest.raises(UsageError, match="answer"):
        score({"kind": "math"}, "1")


SCHEMA = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}


def test_json_schema():
    task = {"kind": "json", "schema": SCHEMA}
    assert score(task, '{"name": "Ada", "age": 36}') == (1.0, "valid against the schema")
    assert score(task, 'Sure:\n```json\n{"name": "Ada", "age": 36}\n```')[0] == 1.0
    reward, reason = score(task, '{"name": "Ada", "age": -1}')
    assert reward == 0.0 and reason.startswith("schema violation at age")
    reward, reason = score(task, '{"name": "Ada"}')
    assert reward == 0.0 and "'age' is a required property" in reason
    reward, reason = score(task, '{"name": "Ada", "age": 36, "extra": 1}')
    assert reward == 0.0 and "Additional properties" in reason
    reward, reason = score(task, '{"name": "Ada", "age": 36')
    assert reward == 0.0 and reason.startswith("invalid JSON")
    with pytest.raises(UsageError, match="schema"):
        score({"kind": "json", "schema": {"type": "no-such-type"}}, "{}")


def call(name, **arguments):
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def message(*calls, errors=()):
    return {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": list(calls),
            "errors": list(errors)}


def test_tool_calls():
    task = {"kind": "tool", "expected_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                               {"name": "get_time", "arguments": {"tz": "CET"}}]}
    both = [call("get_weather", city="Oslo"), call("get_time", tz="CET")]
    assert score(task, message(*both)) == (1.0, "2 calls match")
    assert score(task, message(*reversed(both)))[0] == 1.0              # a set: any order
    ordered = dict(task, ordered=True)
    assert score(ordered, message(*both))[0] == 1.0
    reward, reason = score(ordered, message(*reversed(both)))
    assert reward == 0.0 and reason.startswith("call 0: got get_time")
    reward, reason = score(task, message(call("get_weather", city="Bergen"), call("get_time", tz="CET")))
    assert reward == 0.0 and reason.startswith("arguments differ")
    assert score(task, message(both[0]))[1].startswith("missing call get_time")
    assert score(task, message(*both, call("rm", path="/")))[1].startswith("unexpected call rm")
    assert score(task, message(*both, call("get_time", tz="CET")))[0] == 0.0   # a duplicate is extra
    reward, reason = score(task, message(errors=["<tool_call> 1: invalid JSON"]))
    assert reward == 0.0 and reason.startswith("malformed tool call")
    bad_args = message({"function": {"name": "get_time", "arguments": "{tz: CET}"}}, both[0])
    assert score(task, bad_args)[1].startswith("arguments of 'get_time' are not JSON")
    assert score({"kind": "tool", "expected_calls": []}, message())[0] == 1.0
    raw = ('<think>\nweather first\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n'
           '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert score(task, raw) == (1.0, "2 calls match")   # raw text goes through mellum2.chat.parse
    # numbers compare as JSON values: 2 and 2.0 are the same argument
    assert score({"kind": "tool", "expected_calls": [{"name": "f", "arguments": {"n": 2}}]},
                 message(call("f", n=2.0)))[0] == 1.0


def test_bad_tasks():
    with pytest.raises(UsageError, match="kind"):
        score({"kind": "essay"}, "x")
    with pytest.raises(UsageError, match="'kind'"):
        score({}, "x")
    with pytest.raises(UsageError, match="tests"):
        score({"kind": "code", "tests": 3}, "x = 1")
