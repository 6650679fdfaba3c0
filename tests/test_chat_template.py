"""The chat template: `mellum2.chat.render` and transformers' `apply_chat_template` on a saved tokenizer
give the same string for every message shape; the format itself pinned on small cases; bad messages
are errors naming the index and field; every tokenizer writer saves the template."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mellum2.chat import TEMPLATE, ChatFormatError, opens_think, prompt_ids, render
from mellum2.errors import MellumError
from mellum2.tokenizer import Tokenizer, train_bpe

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
CLOCK = {"name": "now", "description": "the time (a bare function schema)", "parameters": {"type": "object"}}


def call(name, args, id_=None):
    c = {"type": "function", "function": {"name": name, "arguments": args}}
    return c if id_ is None else {"id": id_, **c}


SYSTEM = {"role": "system", "content": "You are Mellum 2, a code model."}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    "system": [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    "only a user": [{"role": "user", "content": "Write fib in Python, é ü 中文"}],
    "multi-turn": [SYSTEM, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "assistant", "content": "d\n"},
                   {"role": "user", "content": "e"}],
    "reasoning in several turns": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "two and two", "content": "4"},
        {"role": "user", "content": "times 3?"},
        {"role": "assistant", "reasoning_content": "\n4*3 = 12\n", "content": "12"}],
    "inline reasoning": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nanswer"}],
    "tools, several calls, grouped responses": [
        SYSTEM, {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "reasoning_content": "Two tools.", "content": "Checking.",
         "tool_calls": [call("get_weather", {"city": "Paris", "unit": "C"}, "c1"), call("now", {}, "c2")]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": {"time": "12:00"}},
        {"role": "assistant", "reasoning_content": "Got both.", "content": "18 °C and noon."},
        {"role": "user", "content": "thanks"}],
    "tool call without content, arguments as a JSON string": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", '{"city":  "Oslo"}')]},
        {"role": "tool", "content": "-3 C"},
        {"role": "assistant", "content": "It is -3 °C in Oslo."}],
    "flat tool call and text parts": [
        {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "tool_calls": [{"name": "now", "arguments": {}}]},
        {"role": "tool", "content": "noon"}],
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    tok = train_bpe(["def add(a, b):\n    return a + b\n", "The weather in Paris is sunny."] * 20, 320)
    return tok.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, [WEATHER, CLOCK]])
@pytest.mark.parametrize("gen,think", [(False, True), (True, True), (True, False)])
def test_render_equals_transformers(hf_tok, name, tools, gen, think):
    msgs = CONVERSATIONS[name]
    ours = render(msgs, tools=tools, add_generation_prompt=gen, enable_thinking=think)
    theirs = hf_tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, enable_thinking=think,
                                        tokenize=False)
    assert ours == theirs
    if think:  # transformers' default leaves enable_thinking undefined in the template: the same as True
        assert hf_tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, tokenize=False) == ours


def test_saved_files_hold_the_one_template(tok_dir, hf_tok):
    assert (tok_dir / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert hf_tok.chat_template == TEMPLATE


def test_tokenizer_cli_writes_the_template(tmp_path):
    from mellum2.tokenizer.cli import main
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def add(a, b):\n    return a + b\n" * 50)
    assert main(["train", "--input", str(src), "--vocab-size", "300", "--out", str(tmp_path / "tok"),
                 "--no-progress"]) == 0
    assert (tmp_path / "tok" / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE


def test_the_format():
    msgs = CONVERSATIONS["reasoning in several turns"]
    assert render(msgs) == (
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"  # reasoning before the last user message is dropped
        "<|im_start|>user\ntimes 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n4*3 = 12\n\n</think>\n\n12<|im_end|>\n")  # kept, verbatim
    assert render(msgs[:1], add_generation_prompt=True) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert render(msgs[:1], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render(msgs[:2], enable_thinking=False) == render(msgs[:2])  # only the generation prompt changes
    assert render(CONVERSATIONS["inline reasoning"]).endswith("assistant\n<think>\nhmm\n</think>\n\nanswer<|im_end|>\n")

    conv = CONVERSATIONS["tools, several calls, grouped responses"]
    assert "<think>" not in render(conv, tools=[WEATHER])  # it ends with a user message
    t = render(conv[:-1], tools=[WEATHER])  # reasoning after the last user message is kept
    assert t.startswith("<|im_start|>system\nYou are Mellum 2, a code model.\n\n# Tools\n")
    assert "\n<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>\n" in t
    assert t.count("<|im_start|>system") == 1
    assert ("<|im_start|>assistant\n<think>\nTwo tools.\n</think>\n\nChecking.\n"
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"C\"}}\n</tool_call>\n"
            "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call><|im_end|>\n"
            "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n"
            "<tool_response>\n{\"time\": \"12:00\"}\n</tool_response><|im_end|>\n") in t
    t = render(CONVERSATIONS["tool call without content, arguments as a JSON string"])
    assert "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":  \"Oslo\"}}\n" in t


def test_arguments_as_dict_or_canonical_string_render_the_same():
    def conv(args):
        return [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call("f", args)]}]
    args = {"path": "ä/b.py", "lines": [1, 2], "opts": {"dry": True, "n": None}}
    assert render(conv(args)) == render(conv(json.dumps(args, ensure_ascii=False)))


def test_prompt_ids_and_opens_think(tok_dir):
    tok = Tokenizer.load(tok_dir)
    msgs = [{"role": "user", "content": "Hi"}]
    ids = prompt_ids(tok, msgs, enable_thinking=False)
    assert tok.decode(ids) == render(msgs, add_generation_prompt=True, enable_thinking=False)
    assert ids[:1] == [tok.im_start_id] and ids.count(tok.im_end_id) == 1 and tok.think_id in ids
    assert not opens_think(render(msgs, add_generation_prompt=True))
    assert not opens_think(render(msgs, add_generation_prompt=True, enable_thinking=False))
    assert opens_think(render(msgs, add_generation_prompt=True) + "<think>\n")
    assert not opens_think("no chat at all <think>")


U = {"role": "user", "content": "hi"}
BAD = [
    ([U, {"role": "robot", "content": "x"}], "messages[1].role: unknown role 'robot'"),
    ([{"content": "x"}], "messages[0].role: unknown role None"),
    (["hi"], "messages[0]: expected an object"),
    ([], "messages: empty"),
    ("hi", "messages: expected a list"),
    ([{"role": "user", "content": None}], "messages[0].content: missing"),
    ([{"role": "user", "content": 3}], "messages[0].content: expected a string or a list of text parts, got a number"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "messages[0].content[0]: only"),
    ([{"role": "user", "content": "a<|im_end|>b"}], "messages[0].content: holds the control token <|im_end|>"),
    ([U, {"role": "assistant", "content": "x", "reasoning_content": 5}], "messages[1].reasoning_content: expected a string"),
    ([U, {"role": "assistant", "tool_calls": [call("f", [1, 2])]}],
     "messages[1].tool_calls[0].function.arguments: expected a JSON object, got a list"),
    ([U, {"role": "assistant", "tool_calls": [call("f", "[1, 2]")]}],
     "messages[1].tool_calls[0].function.arguments: expected a JSON object, got a list"),
    ([U, {"role": "assistant", "tool_calls": [call("f", "{bad")]}],
     "messages[1].tool_calls[0].function.arguments: not valid JSON"),
    ([U, {"role": "assistant", "tool_calls": [call("", {})]}], "messages[1].tool_calls[0].function.name: expected a non-empty"),
    ([U, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}],
     "messages[1].tool_calls[0].function.arguments: missing"),
    ([U, {"role": "assistant", "tool_calls": {"name": "f"}}], "messages[1].tool_calls: expected a list"),
    ([U, {"role": "tool", "content": "42"}], "messages[1]: a tool result with no tool call before it"),
    ([U, {"role": "assistant", "tool_calls": [call("f", {})]}, {"role": "tool", "content": "1"},
      {"role": "tool", "content": "2"}], "messages[3]: a tool result with no tool call before it"),
    ([U, {"role": "assistant", "tool_calls": [call("f", {}, "a")]}, {"role": "tool", "tool_call_id": "b", "content": "1"}],
     "messages[2].tool_call_id: 'b' answers none"),
    ([U, {"role": "assistant", "tool_calls": [call("f", {})]}, U, {"role": "tool", "content": "1"}],
     "messages[3]: a tool result with no tool call before it"),
]


@pytest.mark.parametrize("msgs,match", BAD, ids=[m for _, m in BAD])
def test_bad_messages_name_index_and_field(msgs, match):
    with pytest.raises(ChatFormatError) as e:
        render(msgs)
    assert match in str(e.value)
    assert isinstance(e.value, MellumError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("tools,match", [
    ("get_weather", "tools: expected a list"), ([3], "tools[0]: expected an object"),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0]: expected"),
])
def test_bad_tools(tools, match):
    with pytest.raises(ChatFormatError, match=match.replace("[", r"\[").replace("]", r"\]")):
        render([U], tools=tools)


def test_transformers_also_refuses_what_the_template_cannot_render(hf_tok):
    import jinja2
    with pytest.raises(jinja2.TemplateError, match=r"messages\[1\].role: unknown role"):
        hf_tok.apply_chat_template([U, {"role": "robot", "content": "x"}], tokenize=False)
    with pytest.raises(jinja2.TemplateError, match=r"tool_calls\[0\].function.arguments: expected a JSON object"):
        hf_tok.apply_chat_template([U, {"role": "assistant", "tool_calls": [call("f", [1])]}], tokenize=False)


# ------------------------------------------------------------------ random conversations, both renderers

TEXT = st.lists(st.sampled_from(list("ab \n\t{}\"\\é中<>/") + ["</think>", "<tool_call>", "\n\n"]),
                max_size=8).map("".join)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
                    | TEXT, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=6)
ARGS = st.dictionaries(TEXT, JSON, max_size=3)


@st.composite
def conversations(draw):
    msgs = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(TEXT)})
        for _ in range(draw(st.integers(0, 2))):
            m = {"role": "assistant", "content": draw(st.none() | TEXT)}
            if draw(st.booleans()):
                m["reasoning_content"] = draw(TEXT)
            n = draw(st.integers(0, 2))
            if n:
                m["tool_calls"] = [call(draw(st.sampled_from(["f", "get_weather", "ü"])),
                                        draw(ARGS.map(lambda a: json.dumps(a, ensure_ascii=False)) | ARGS))
                                   for _ in range(n)]
            msgs.append(m)
            for _ in range(n):
                msgs.append({"role": "tool", "content": draw(TEXT | st.dictionaries(TEXT, JSON, max_size=2))})
    return msgs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=conversations(), tools=st.sampled_from([None, [], [WEATHER], [WEATHER, CLOCK]]),
       gen=st.booleans(), think=st.booleans())
def test_random_conversations_render_as_transformers(hf_tok, msgs, tools, gen, think):
    ours = render(msgs, tools=tools, add_generation_prompt=gen, enable_thinking=think)
    assert ours == hf_tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen,
                                              enable_thinking=think, tokenize=False)


@pytest.mark.parametrize("msgs,tools,match", [
    ([U, {"role": "assistant", "tool_calls": [call("f", {"x": "<|im_end|>"})]}], None,
     r"messages\[1\].tool_calls\[0\].function.arguments: holds the control token <\|im_end\|>"),
    ([U, {"role": "assistant", "tool_calls": [call("f", '{"x": "<|im_start|>"}')]}], None, "control token"),
    ([U, {"role": "assistant", "tool_calls": [call("f<|endoftext|>", {})]}], None, r"function.name: holds"),
    ([U, {"role": "assistant", "tool_calls": [call("f", {"x": {1, 2}})]}], None, "not JSON-serialisable"),
    ([U], [{"name": "f", "description": "<|im_end|>"}], r"tools\[0\]: holds the control token"),
])
def test_control_tokens_cannot_hide_in_json(msgs, tools, match):
    with pytest.raises(ChatFormatError, match=match):
        render(msgs, tools=tools)
