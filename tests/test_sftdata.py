"""The embedded SFT data: determinism, the train / held-out split, message shapes for both modes, tool
calls valid against their schemas, tool responses true to the tools, every code solution passing its
tests, identity oversampling, and the held-out evaluation prompts with their expectations."""
import collections
import dataclasses
import json
import random
import time

import jsonschema
import pytest

from mellum2.posttrain import codebank, codetasks, mathtasks, sfteval, sftdata, tooldialogs, tools
from mellum2.posttrain.formats import normalise
from mellum2.posttrain.splits import heldout

N = 1200


@pytest.fixture(scope="module")
def data():
    return {(split, mode): sftdata.sft_conversations(split, mode, n=N if split == "train" else 300)
            for split in ("train", "heldout") for mode in ("instruct", "thinking")}


def test_deterministic_and_seeded(data):
    again = sftdata.sft_conversations("train", "thinking", n=N)
    assert again == data["train", "thinking"]
    other = sftdata.sft_conversations("train", "thinking", n=N, seed=1)
    assert [c["id"] for c in other] != [c["id"] for c in again]


def test_default_size_is_fast():
    t = time.perf_counter()
    convs = sftdata.sft_conversations("train", "thinking")
    assert len(convs) == sftdata.DEFAULT_N["train"]
    assert time.perf_counter() - t < 30  # ~1 s on an idle core, checks included


def test_train_and_heldout_are_disjoint():
    train = sftdata.sft_items("train", n=3000)
    held = sftdata.sft_items("heldout", n=600)
    train_keys = {it.key for it in train}
    assert not train_keys & {it.key for it in held}
    # by construction: keys of drawn items hash into their own split
    for items, want in ((train, False), (held, True)):
        for it in items:
            if it.source not in ("tool.clarify", "tool.no_tool", "identity"):
                assert heldout(it.key) == want, it.key
    # every fact or expression a tool is asked about (all successful calls) belongs to the item's split
    for items, want in ((train, False), (held, True)):
        for it in items:
            calls = [c for m in it.messages for c in m.get("tool_calls", [])]
            replies = {m["tool_call_id"]: m["content"] for m in it.messages if m["role"] == "tool"}
            for c in calls:
                if '"error"' not in replies[c["id"]]:
                    assert heldout(tooldialogs.part_key(c)) == want, (it.source, c)
    # phrasing-split kinds: no held-out user request appears in train
    train_requests = {m["content"] for it in train for m in it.messages if m["role"] == "user"}
    for it in held:
        if it.source in ("tool.clarify", "tool.no_tool", "identity"):
            first_user = next(m["content"] for m in it.messages if m["role"] == "user" and m["content"] != "Hi!")
            assert first_user not in train_requests, first_user


def _check_shapes(conv, mode):
    assert set(conv) <= {"messages", "tools", "source", "id"}
    assert conv["source"] in dict(sftdata.MIX)
    msgs = conv["messages"]
    assert msgs[-1]["role"] == "assistant" and any(m["role"] == "user" for m in msgs)
    pending = {}
    for m in msgs:
        assert m["role"] in ("system", "user", "assistant", "tool")
        assert isinstance(m["content"], str)
        if m["role"] == "assistant":
            if mode == "thinking":
                assert isinstance(m["reasoning_content"], str) and m["reasoning_content"].strip()
            else:
                assert "reasoning_content" not in m
            for c in m.get("tool_calls", []):
                assert c["type"] == "function" and c["id"] not in pending
                assert isinstance(json.loads(c["function"]["arguments"]), dict)
                pending[c["id"]] = c["function"]["name"]
            assert m["content"] or m.get("tool_calls")
        if m["role"] == "tool":
            assert pending.pop(m["tool_call_id"]) == m["name"]
    assert not pending, "a tool call without its result"
    # the reader accepts what the generators write, unchanged
    back = normalise(json.loads(json.dumps(conv)), "gen")
    assert back["messages"] == msgs and back.get("tools") == conv.get("tools")


def test_shapes_both_modes(data):
    for (split, mode), convs in data.items():
        for conv in convs:
            _check_shapes(conv, mode)


def test_mixture_and_identity_oversampling(data):
    convs = data["train", "instruct"]
    counts = collections.Counter(c["source"] for c in convs)
    assert set(counts) == set(dict(sftdata.MIX))
    ident = [c for c in convs if c["source"] == "identity"]
    per_id = collections.Counter(c["id"] for c in ident)
    assert set(per_id.values()) == {3}, "each distinct identity dialogue appears 3 times in train"
    assert abs(len(ident) / len(convs) - dict(sftdata.MIX)["identity"]) < 0.01
    for c in ident:
        assert "Mellum 2" in c["messages"][-1]["content"] and "JetBrains" in c["messages"][-1]["content"]
    held = collections.Counter(c["id"] for c in data["heldout", "instruct"] if c["source"] == "identity")
    assert set(held.values()) == {1}


def test_tool_calls_match_their_schemas(data):
    for (_, mode), convs in data.items():
        for conv in convs:
            offered = {t["function"]["name"]: t["function"]["parameters"] for t in conv.get("tools", [])}
            for m in conv["messages"]:
                for c in m.get("tool_calls", []):
                    name = c["function"]["name"]
                    assert name in offered, f"{name} called but not offered"
                    jsonschema.validate(json.loads(c["function"]["arguments"]), offered[name])
            for name, schema in offered.items():
                jsonschema.Draft202012Validator.check_schema(schema)


def test_tool_responses_are_what_the_tools_return(data):
    """Calculator and lookup replies recomputed; python replies checked by really running the code."""
    jobs = []
    for conv in data["train", "thinking"] + data["heldout", "thinking"]:
        calls = {c["id"]: c for m in conv["messages"] for c in m.get("tool_calls", [])}
        for m in conv["messages"]:
            if m["role"] != "tool":
                continue
            c = calls[m["tool_call_id"]]
            args = json.loads(c["function"]["arguments"])
            if c["function"]["name"] == "python":
                reply = json.loads(m["content"])
                jobs.append(({"code": args["code"], "stdio": [["", reply.get("stdout", "")]]}, reply.get("error")))
            else:
                assert m["content"] == tools.run_tool(c["function"]["name"], args)
    assert len(jobs) > 20
    results = codetasks.run_jobs([j for j, _ in jobs])
    for (job, error), got in zip(jobs, results):
        assert got == error, (job["code"], got, error)


def test_final_answers_follow_the_tool_results(data):
    for conv in data["train", "instruct"]:
        if conv["source"] == "tool.calculator":
            value = json.loads(conv["messages"][-2]["content"])["result"]
            assert str(value) in conv["messages"][-1]["content"]


def test_every_code_solution_passes_its_tests():
    items = sftdata.sft_items("train", n=3000) + sftdata.sft_items("heldout", n=300)
    specs = [s for it in items for s in it.specs]
    assert len({s.key for s in specs}) > 300
    codetasks.check_specs(specs)  # raises AssertionError naming any failing task
    # and the answer shown to the model is that very solution
    for it in items:
        if it.source == "code":
            assert f"```python\n{it.specs[0].solution}```" in it.messages[-1]["content"]


def test_checker_catches_a_wrong_solution():
    spec = codebank.count_char(random.Random(0))
    codetasks.check_specs([spec])
    broken = dataclasses.replace(spec, solution=spec.solution.replace("return", "return 1 +", 1))
    with pytest.raises(AssertionError, match="count_char"):
        codetasks.check_specs([broken])
    looping = dataclasses.replace(spec, solution=spec.solution.replace("return", "while True: pass\n    return", 1))
    assert codetasks.run_jobs([{"code": looping.solution, "tests": list(spec.tests)}], per_job_s=1) == ["TimeoutError: timed out"]


def test_coding_task_count_and_variety():
    keys = {codetasks.code_spec("train", 0, i).key for i in range(3000)}
    assert len(keys) >= 300
    templates = {k.split(":")[1] for k in keys}
    assert len(templates) >= 60


def test_math_replies_end_with_the_answer_line(data):
    for mode in ("instruct", "thinking"):
        for conv in data["train", mode]:
            if conv["source"] == "math":
                reply = conv["messages"][-1]
                assert mathtasks.extract_answer(reply["content"]) is not None
                if mode == "thinking":
                    assert reply["content"].startswith("The answer is") and reply["reasoning_content"]
                else:
                    assert "\n" in reply["content"], "Instruct math replies show their steps"


def test_extract_answer():
    assert mathtasks.extract_answer("3 + 4 = 7.\n\nThe answer is 7.") == "7"
    assert mathtasks.extract_answer("The answer is 12.50.") == "12.50"
    assert mathtasks.extract_answer("The answer is x = -3.\n") == "x = -3"
    assert mathtasks.extract_answer("The answer is 7.\nWait, no.") is None
    assert mathtasks.extract_answer("") is None


def test_eval_prompts_and_their_expectations():
    items = sfteval.sft_eval_prompts()
    assert len(items) == 200 and items == sfteval.sft_eval_prompts()
    kinds = collections.Counter(i["kind"] for i in items)
    assert kinds["tool"] >= 60 and kinds["identity"] >= 20 and kinds["clarify"] >= 10
    train_users = {m["content"] for c in sftdata.sft_conversations("train", "instruct") for m in c["messages"]
                   if m["role"] == "user"}
    for it in items:
        assert it["messages"][-1]["role"] == "user"
        if it["kind"] in ("identity", "clarify", "no_tool"):
            assert it["messages"][-1]["content"] not in train_users
        if it["kind"] == "tool":
            offered = {t["function"]["name"] for t in it["tools"]}
            assert {c["name"] for c in it["expect"]["tool_calls"]} <= offered


def test_check_reply_on_reference_and_wrong_replies():
    """The first assistant turn of each held-out conversation passes its own expectation; wrong ones fail."""
    for kind, _ in sfteval.EVAL_MIX:
        for i in range(4):
            it = sftdata.make_item(kind, "heldout", 0, i, thinking=False, stream="eval:", exact_math=True)
            item = {"kind": sfteval.KINDS.get(kind, kind), "expect": it.expect}
            ref = it.messages[it.prompt_end()]
            if kind == "tool.recovery":  # the expectation is the corrected call, sent after the tool error
                ref = [m for m in it.messages if m.get("tool_calls")][-1]
            got = sfteval.check_reply(item, ref)
            assert got["ok"] is not False, (kind, got, ref)
            wrong = {"role": "assistant", "content": "I don't know"}
            if kind in ("tool.calculator", "tool.lookup", "tool.multi", "tool.recovery", "tool.python"):
                assert sfteval.check_reply(item, wrong)["ok"] is False
            elif kind in ("identity", "math", "json", "tool.clarify"):
                assert sfteval.check_reply(item, wrong)["ok"] is False


def test_calls_match_rules():
    exp = [{"name": "calculator", "arguments": {"expression": "2 * 21"}},
           {"name": "lookup", "arguments": {"entity": "Peru", "field": "capital"}}]
    match = {"calculator": {"expression": "value"}, "lookup": {"entity": "text", "field": "exact"}}
    call = lambda n, a: {"type": "function", "function": {"name": n, "arguments": json.dumps(a)}}  # noqa: E731
    ok = [call("lookup", {"entity": " peru", "field": "capital"}), call("calculator", {"expression": "42"})]
    assert sfteval.calls_match(exp, ok, match)[0] is True  # any order, value-equal expression
    assert sfteval.calls_match(exp, ok[:1], match)[0] is False
    assert sfteval.calls_match(exp, [ok[0], call("calculator", {"expression": "41"})], match)[0] is False
    assert sfteval.calls_match(exp, [call("lookup", {"entity": "Peru", "field": "continent"}), ok[1]], match)[0] is False
    bad_json = [{"type": "function", "function": {"name": "lookup", "arguments": "{oops"}}, ok[1]]
    assert sfteval.calls_match(exp, bad_json, match)[0] is False


def test_chat_template_parser_and_sft_examples(data):
    """Every conversation renders; each assistant turn parses back (content, reasoning, tool calls) with
    no errors; sft_examples gives trained tokens in both modes."""
    from mellum2.chat import parse, render
    from mellum2.posttrain import sft_examples
    from mellum2.tokenizer import train_bpe

    tok = train_bpe(["def add(a, b):\n    return a + b\n", "The answer is 42.", '{"name": "calculator"}'] * 20, 400)
    for (split, mode), convs in data.items():
        for k, conv in enumerate(convs):
            text = render(conv["messages"], tools=conv.get("tools"))
            assert text.endswith("<|im_end|>\n")
            for j, m in enumerate(conv["messages"]):
                if m["role"] != "assistant":
                    continue
                turn = render([{"role": "user", "content": "q"}, m]).split("<|im_start|>assistant\n", 1)[1]
                got = parse(turn)
                assert not got["errors"] and got["content"] == m["content"], (m, got)
                assert (got.get("reasoning_content") or None) == (m.get("reasoning_content") or None)
                want_calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m.get("tool_calls", [])]
                assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                        for c in got.get("tool_calls") or []] == want_calls
            if k % 10 == 0 and split == "train":
                examples = sft_examples(tok, conv["messages"], mode, tools=conv.get("tools"))
                assert examples and all(any(x != -100 for x in labels) for _, labels in examples)


def test_same_data_in_every_process():
    """No dependence on string hashing (set order) or other per-process state."""
    import os
    import subprocess
    import sys

    code = ("import json, hashlib; from mellum2.posttrain import sft_conversations, rl_tasks; "
            "d = [sft_conversations('train', 'thinking', n=300), rl_tasks('heldout', n=100)]; "
            "print(hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(digests) == 1
