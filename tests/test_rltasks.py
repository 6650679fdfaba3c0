"""The embedded RL tasks: determinism, the train / held-out split, difficulty and kind selection, and
every task solvable by its reference reply under the check its verifier will apply (math-verify,
hidden tests, jsonschema, tool-call matching) - while wrong replies fail those same checks."""
import collections
import json
import re

import jsonschema
import pytest
from math_verify import parse, verify

from mellum2.posttrain import codetasks, jsontasks, mathtasks, rltasks, sfteval, tools


@pytest.fixture(scope="module")
def train():
    return rltasks.rl_tasks("train", n=1200)


@pytest.fixture(scope="module")
def held():
    return rltasks.rl_tasks("heldout", n=400)


def test_deterministic(train):
    assert rltasks.rl_tasks("train", n=1200) == train
    assert rltasks.rl_tasks("train", n=1200, seed=1) != train
    assert len({t["id"] for t in train}) == len(train)


def test_shapes(train):
    common = {"id", "kind", "messages", "difficulty", "reference"}
    need = {"math": {"answer"}, "code": {"tests", "test_style", "entry_point"}, "json": {"schema"},
            "tool": {"tools", "expected_calls", "match", "ordered"}}
    for t in train:
        assert common | need[t["kind"]] <= set(t), t["kind"]
        assert t["messages"][-1]["role"] == "user" and t["reference"]["role"] == "assistant"
        assert t["difficulty"] in (1, 2, 3)
    counts = collections.Counter(t["kind"] for t in train)
    assert counts == {"math": 300, "code": 300, "json": 300, "tool": 300}
    by_level = collections.Counter(t["difficulty"] for t in train)
    assert by_level[1] > 400 and by_level[3] > 150


def test_heldout_disjoint(train, held):
    def keys(tasks):
        out = set()
        for t in tasks:
            if t["kind"] == "math":
                out.add(("math", t["messages"][0]["content"]))
            elif t["kind"] == "code":
                out.add(("code", t["reference"]["content"]))
            elif t["kind"] == "json":
                out.add(("json", json.dumps(t["schema"], sort_keys=True)))
            else:
                out.add(("tool", json.dumps(t["expected_calls"], sort_keys=True)))
        return out
    assert not keys(train) & keys(held)
    # one-digit sums are a small space; held-out pairs are never asked in train
    pairs = lambda ts: {re.search(r"(\d+) \+ (\d+)", t["messages"][0]["content"]).groups()  # noqa: E731
                        for t in ts if t["kind"] == "math" and t["difficulty"] == 1
                        and re.search(r"^\D*(\d) \+ (\d)\D", t["messages"][0]["content"])}
    assert pairs(train) and pairs(held) and not pairs(train) & pairs(held)


def test_difficulty_and_kinds_filters():
    easy = rltasks.rl_tasks("train", kinds=["math", "json"], n=60, difficulty=1)
    assert {t["kind"] for t in easy} == {"math", "json"} and {t["difficulty"] for t in easy} == {1}
    for t in easy:
        if t["kind"] == "math":
            assert int(t["answer"]) <= 18
        else:
            assert len(t["schema"]["properties"]) == 1
    hard = rltasks.rl_tasks("heldout", n=40, difficulty=(2, 3))
    assert {t["difficulty"] for t in hard} <= {2, 3}
    with pytest.raises(ValueError, match="difficulty"):
        rltasks.rl_tasks(difficulty=4)
    with pytest.raises(ValueError, match="kinds"):
        rltasks.rl_tasks(kinds=["poetry"])
    with pytest.raises(ValueError, match="split"):
        rltasks.rl_tasks("test")


def _math_ok(task, content):
    got = mathtasks.extract_answer(content)
    return got is not None and verify(parse(f"${task['answer']}$"), parse(f"${got}$"))


def _code(content):
    blocks = re.findall(r"```python\n(.*?)```", content, re.S)
    return blocks[-1] if blocks else ""


def _code_jobs(tasks, reply):
    jobs = []
    for t in tasks:
        code = _code(reply(t))
        if t["test_style"] == "stdio":
            jobs.append({"code": code, "stdio": [[c["stdin"], c["stdout"]] for c in t["tests"]]})
        else:
            jobs.append({"code": code, "tests": t["tests"]})
    return jobs


def _json_ok(task, content):
    try:
        jsonschema.validate(json.loads(jsontasks.strip_fence(content)), task["schema"])
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_references_pass_and_wrong_replies_fail(train, held):
    tasks = train + held
    code = [t for t in tasks if t["kind"] == "code"]
    assert all(r is None for r in codetasks.run_jobs(_code_jobs(code, lambda t: t["reference"]["content"])))
    # a wrong program (the reference with its entry point returning a fresh object, or one more line
    # printed first) fails its tests
    def mangle(t):
        c, f = _code(t["reference"]["content"]), t["entry_point"]
        wrong = f"{c}\ndef {f}(*args, **kwargs):\n    return object()\n" if f else "print('0')\n" + c
        return f"```python\n{wrong}```"
    bad = [t for t in code if not _code(t["reference"]["content"]).startswith("class ")]
    assert all(r is not None for r in codetasks.run_jobs(_code_jobs(bad, mangle)))
    for t in tasks:
        ref = t["reference"]
        if t["kind"] == "math":
            assert _math_ok(t, ref["content"]), t
            assert not _math_ok(t, ref["content"].rsplit("The answer is", 1)[0] + f"The answer is {t['answer']}1.")
            assert not _math_ok(t, ref["content"].rsplit("\n", 1)[0])  # no answer line
        elif t["kind"] == "json":
            assert _json_ok(t, ref["content"]), t
            assert _json_ok(t, f"```json\n{ref['content']}\n```")
            value = json.loads(ref["content"])
            if isinstance(value, dict):
                k = next(iter(value))
                assert not _json_ok(t, json.dumps({**value, k: [value[k]]}))
                assert not _json_ok(t, json.dumps({**value, "extra": 1}))
            else:
                assert not _json_ok(t, json.dumps(value[:-1]))
        elif t["kind"] == "tool":
            assert sfteval.calls_match(t["expected_calls"], ref["tool_calls"], t["match"])[0] is True
            reordered = list(reversed(ref["tool_calls"]))
            assert sfteval.calls_match(t["expected_calls"], reordered, t["match"])[0] is True
            assert sfteval.calls_match(t["expected_calls"], ref["tool_calls"][:-1], t["match"])[0] is False
            offered = {x["function"]["name"]: x["function"]["parameters"] for x in t["tools"]}
            for c in ref["tool_calls"]:
                jsonschema.validate(json.loads(c["function"]["arguments"]), offered[c["function"]["name"]])
                assert "error" not in tools.run_tool(c["function"]["name"], json.loads(c["function"]["arguments"]))


def test_easy_tool_tasks_offer_only_the_calculator(train):
    easy = [t for t in train if t["kind"] == "tool" and t["difficulty"] == 1]
    assert easy
    for t in easy:
        assert [x["function"]["name"] for x in t["tools"]] == ["calculator"]
        assert len(t["expected_calls"]) == 1


def test_code_tasks_have_both_test_styles(train):
    styles = collections.Counter(t["test_style"] for t in train if t["kind"] == "code")
    assert styles["assert"] > 100 and styles["stdio"] > 20
    for t in train:
        if t["kind"] == "code" and t["test_style"] == "assert":
            assert t["entry_point"] and all(t["entry_point"] in x for x in t["tests"])
            # hidden: the prompt shows no test
            assert not any(x.removeprefix("assert ").split(" == ")[0] in t["messages"][-1]["content"]
                           for x in t["tests"] if x.startswith("assert "))
