"""The output parser: parse(render(message)) is the message; malformed tool calls are reported with
their raw text kept; the incremental parser gives parse's message for every way of cutting the text,
and its deltas (Hermes/OpenAI shaped) add up to that message."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mellum2.chat import StreamParser, apply_delta, parse, render

SETTINGS = settings(max_examples=300, deadline=None)


def generated(msg: dict, history=({"role": "user", "content": "q"},)) -> str:
    """What the model writes for `msg`: its rendered turn after the assistant header."""
    text = render([*history, msg])
    return text[text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):]


def expected(msg: dict, prefix: str = "call_") -> dict:
    calls = []
    for k, c in enumerate(msg.get("tool_calls") or []):
        args = c["function"]["arguments"]
        args = json.loads(args) if isinstance(args, str) else args
        calls.append({"id": f"{prefix}{k}", "type": "function",
                      "function": {"name": c["function"]["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    return {"role": "assistant", "content": msg.get("content") or "",
            "reasoning_content": msg.get("reasoning_content") or None, "tool_calls": calls, "errors": []}


def streamed(text: str, cuts=(), **kw) -> tuple[dict, dict]:
    """(the parser's message, the message a client builds by applying the deltas) for text cut at `cuts`."""
    p = StreamParser(**kw)
    bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    deltas = [d for a, b in zip(bounds, bounds[1:]) for d in p.feed(text[a:b])] + p.close()
    for d in deltas:
        assert len(d) == 1 or set(d) == {"error", "index"}, d  # one field per delta
        assert all(v != "" for k, v in d.items() if k in ("content", "reasoning_content")), d
    client = {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": [], "errors": []}
    for d in deltas:
        apply_delta(client, d)
    for c in client["tool_calls"]:
        c.pop("index")
    if p.message["reasoning_content"] == "":  # an empty think span sends no delta
        client["reasoning_content"] = ""
    return p.message, client


# ------------------------------------------------------------------ round trip
def test_round_trip_examples():
    msgs = [
        {"role": "assistant", "content": "Hello!"},
        {"role": "assistant", "content": "4", "reasoning_content": "2 + 2 = 4"},
        {"role": "assistant", "content": "\nleading and trailing newlines\n", "reasoning_content": "\n\nr\n"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "assistant", "content": "Two calls.\n", "reasoning_content": "both", "tool_calls": [
            {"type": "function", "function": {"name": "a", "arguments": '{"x": [1, 2.5, true, null]}'}},
            {"type": "function", "function": {"name": "b", "arguments": {}}}]},
    ]
    for m in msgs:
        text = generated(m)
        assert text.endswith("<|im_end|>\n")
        assert parse(text) == expected(m), text
        assert streamed(text, range(0, len(text), 3)) == (expected(m), expected(m))


TEXT = st.lists(st.sampled_from(list("ab \n\t{}[]\":,\\é中<>/|") + ["\n\n", "think", "tool_call"]),
                max_size=10).map("".join).filter(
    lambda s: not any(t in s for t in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<|im_end|>",
                                       "<|im_start|>", "<|endoftext|>")))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | TEXT, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8)


@st.composite
def assistant_messages(draw):
    m = {"role": "assistant", "content": draw(st.none() | TEXT)}
    if draw(st.booleans()):
        m["reasoning_content"] = draw(TEXT)
    n = draw(st.integers(0, 3))
    if n:
        m["tool_calls"] = [{"type": "function", "function": {
            "name": draw(st.sampled_from(["f", "get_weather", "ü_1"])),
            "arguments": draw(st.dictionaries(TEXT, JSON, max_size=3).map(
                lambda a: a if draw(st.booleans()) else json.dumps(a, ensure_ascii=False)))}} for _ in range(n)]
    return m


@SETTINGS
@given(assistant_messages(), st.lists(st.integers(0, 10**4), max_size=12))
def test_parse_inverts_render(msg, cuts):
    text = generated(msg)
    assert parse(text) == expected(msg)
    assert streamed(text, cuts) == (expected(msg), expected(msg))
    # rendered before a later user message the turn loses its reasoning, and parses so
    later = render([{"role": "user", "content": "q"}, msg, {"role": "user", "content": "again"}])
    turn = later[later.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):]
    assert parse(turn) == {**expected(msg), "reasoning_content": None}


# ------------------------------------------------------------------ malformed output
@pytest.mark.parametrize("body,error", [
    ('{"name": "f", "arguments": {"a": 1}', "invalid JSON"),
    ("not json", "invalid JSON"),
    ('{"arguments": {}}', "no function name"),
    ('{"name": "", "arguments": {}}', "no function name"),
    ('{"name": 3, "arguments": {}}', "no function name"),
    ('{"name": "f", "arguments": [1, 2]}', '"arguments" must be a JSON object, got a list'),
    ('{"name": "f", "arguments": "{\\"a\\": 1}"}', '"arguments" must be a JSON object, got a string'),
    ('["f", {}]', "expected a JSON object with name and arguments, got a list"),
    ('{"name": "f", "arguments": {"a": 1, "a": 2}}', "duplicate key 'a'"),
])
def test_malformed_call_is_reported_and_kept(body, error):
    text = f"Let me see.\n<tool_call>\n{body}\n</tool_call>\n<tool_call>\n{{\"name\": \"ok\", \"arguments\": {{}}}}\n</tool_call><|im_end|>"
    m = parse(text)
    assert m["content"] == f"Let me see.\n<tool_call>\n{body}\n</tool_call>"  # raw text, tags and all
    assert [c["function"]["name"] for c in m["tool_calls"]] == ["ok"]
    assert m["tool_calls"][0]["id"] == "call_1"  # ids count every <tool_call>, the broken one included
    assert len(m["errors"]) == 1 and m["errors"][0].startswith("tool call 0: ") and error in m["errors"][0]
    assert streamed(text, range(0, len(text), 2))[0] == m


def test_unclosed_call_and_truncated_reasoning():
    m = parse('<think>\nstill thinking')
    assert (m["reasoning_content"], m["content"], m["errors"]) == ("still thinking", "", [])
    m = parse('Sure.\n<tool_call>\n{"name": "f", "arguments": {"a"')
    assert m["content"] == 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a"'
    assert m["tool_calls"] == [] and "unclosed <tool_call>" in m["errors"][0]
    m = parse('<tool_call>\n{"name": "f", "arguments": {}}<|im_end|></tool_call>')  # the stop token ends it
    assert "unclosed" in m["errors"][0]


def test_think_open_prompt_and_stops():
    assert parse("a\n</think>\n\nb<|im_end|>", think_open=True) == {
        "role": "assistant", "content": "b", "reasoning_content": "a", "tool_calls": [], "errors": []}
    assert parse("<think>\na\n</think>\n\nb", think_open=True)["reasoning_content"] == "a"
    assert parse("cut off", think_open=True)["reasoning_content"] == "cut off"
    assert parse("a\n</think>\n\nb")["content"] == "a\n</think>\n\nb"  # no open span: all content
    assert parse("x<|endoftext|>y<|im_end|>")["content"] == "x"
    assert parse("  \n<think>\nr\n</think>\nc")["reasoning_content"] == "r"
    assert parse("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>", id_prefix="call_9f_")[
        "tool_calls"][0]["id"] == "call_9f_0"
    with pytest.raises(TypeError):
        parse(b"bytes")


def test_deltas_look_like_hermes():
    text = 'I will call it.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call><|im_end|>'
    p = StreamParser(id_prefix="call_x")
    deltas = []
    for i in range(0, len(text), 4):
        deltas += p.feed(text[i:i + 4])
    deltas += p.close()
    content = [d for d in deltas if "content" in d]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert "".join(d["content"] for d in content) == "I will call it."
    assert calls[0] == {"index": 0, "id": "call_x0", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    pieces = [c["function"]["arguments"] for c in calls[1:]]
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:])
    assert len(pieces) > 3 and "".join(pieces) == '{"city": "Paris", "days": [1, 2]}'
    # the first argument piece arrives before the call is closed (it streams)
    first_piece = next(i for i, d in enumerate(deltas) if "tool_calls" in d and d["tool_calls"][0]["function"].get("arguments"))
    assert first_piece < len(deltas) - 2
    assert p.message == parse(text, id_prefix="call_x")
    with pytest.raises(ValueError):
        p.feed("more")


def test_odd_spacing_and_key_order():
    text = '<tool_call>{ "name" :"f" ,"arguments":{ "x" : [ 1 , 2.50 , true ] ,"y":"\\u00e9" } }</tool_call>'
    m = parse(text)
    assert m["tool_calls"][0]["function"]["arguments"] == '{"x": [1, 2.5, true], "y": "é"}'
    assert streamed(text, range(len(text))) == (m, m)
    text = '<tool_call>\n{"arguments": {"a": 1}, "name": "g"}\n</tool_call>'  # name last: sent whole at the end
    m = parse(text)
    assert m["tool_calls"][0]["function"] == {"name": "g", "arguments": '{"a": 1}'}
    assert streamed(text, range(len(text))) == (m, m)
    m = parse('<tool_call>{"name": "h"}</tool_call>')  # arguments left out
    assert m["tool_calls"][0]["function"]["arguments"] == "{}"


# ------------------------------------------------------------------ any text, any cuts
FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<|im_end|>", "<|endoftext|>", "\n", "\n\n", " ",
             "<tool_", "</thi", "<|im_", "<", "hello", "é中", "{", "}", '"', "\\",
             '\n{"name": "f", "arguments": {"a": 1, "b": [true, null, "x\\"y"]}}\n',
             '{ "name" : "g" , "arguments" : { "q" : -1.50e3 , "r" : {} } }',
             '{"name": "f", "arguments": {"a": 1', '{"name": "f", "arguments": [1]}', '{"name": 1}',
             '{"arguments": {}, "name": "h"}', '{"name": "f", "arguments": {"a": 1, "a": 2}}',
             '{"name": "f", "arguments": {"a": tru}}', '{"name": "f", "arguments": {"a": 1}} x']


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join), st.lists(st.integers(0, 10**4), max_size=16),
       st.booleans())
def test_stream_equals_parse_for_every_cut(text, cuts, think_open):
    want = parse(text, think_open=think_open)
    got, client = streamed(text, cuts, think_open=think_open)
    assert got == want
    if not want["errors"]:
        assert client == want
    got, client = streamed(text, cuts, think_open=think_open, stream_arguments=False)
    assert got == want and client == want  # calls sent whole: the deltas always add up
