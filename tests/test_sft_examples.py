"""SFT example masks: for a 3-turn conversation with a tool call, the expected ids and labels are
written out by hand (each piece of text and whether it carries loss) for both modes; the Thinking
unfolding; the prompt part of every example is what inference feeds the model."""
from __future__ import annotations

import pytest

from mellum2.chat import ChatFormatError, render
from mellum2.errors import UsageError
from mellum2.posttrain import sft_examples
from mellum2.posttrain.sft_examples import spread
from mellum2.tokenizer import train_bpe

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["The weather in Paris is sunny today.\n", "def add(a, b):\n    return a + b\n",
                      '{"name": "get_weather", "arguments": {"city": "Paris"}}'] * 30, 400)


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "Use the tool.", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "18 C"},
    {"role": "assistant", "reasoning_content": "It said 18.", "content": "18 C and sunny."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},  # no reasoning: never a Thinking target
]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def by_hand(tok, pieces):
    """(ids, labels) from [(text, trained)], each piece encoded on its own."""
    ids, labels = [], []
    for text, trained in pieces:
        p = tok.encode(text)
        ids += p
        labels += p if trained else [IGNORE] * len(p)
    return ids, labels


def test_instruct_mask_by_hand(tok):
    [(ids, labels)] = sft_examples(tok, CONV, "instruct")  # no tools: the system turn is plain
    want = by_hand(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        (CALL_TEXT + "<|im_end|>", True),  # the tool call and its <|im_end|>; the reasoning is dropped
        ("\n<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("18 C and sunny.<|im_end|>", True),
        ("\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n", False),
        ("You're welcome.<|im_end|>", True),
        ("\n", False),
    ])
    assert (ids, labels) == want
    assert tok.think_id not in ids
    trained = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert trained.count(tok.im_end_id) == 3 and tok.im_start_id not in trained
    assert [l for l in labels if l != IGNORE] == trained


def test_thinking_masks_by_hand(tok):
    samples = sft_examples(tok, CONV, "thinking", tools=TOOLS)
    head = render(CONV[:1], tools=TOOLS)  # the system turn with the tool list
    assert head.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and head.endswith("</tool_call><|im_end|>\n")
    first = by_hand(tok, [
        (head + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nUse the tool.\n</think>\n\n" + CALL_TEXT + "<|im_end|>", True),
        ("\n", False),
    ])
    second = by_hand(tok, [
        (head + "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
         "<think>\nUse the tool.\n</think>\n\n" + CALL_TEXT + "<|im_end|>\n"  # context: kept, after the last user
         "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nIt said 18.\n</think>\n\n18 C and sunny.<|im_end|>", True),
        ("\n", False),
    ])
    assert samples == [first, second]  # the last turn has no reasoning: no third example


def test_thinking_context_drops_reasoning_before_a_user_message(tok):
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "reasoning_content": "r1", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "reasoning_content": "r2", "content": "d"}]
    ids, labels = sft_examples(tok, conv, "thinking")[1]
    assert (ids, labels) == by_hand(tok, [
        ("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
         "<|im_start|>assistant\n", False), ("<think>\nr2\n</think>\n\nd<|im_end|>", True), ("\n", False)])


def test_prompt_tokens_are_the_inference_prompt(tok):
    for (ids, labels), t in zip(sft_examples(tok, CONV, "thinking", tools=TOOLS), (2, 4)):
        start = next(i for i, l in enumerate(labels) if l != IGNORE)
        assert ids[:start] == tok.encode(render(CONV[:t], tools=TOOLS, add_generation_prompt=True))
    [(ids, labels)] = sft_examples(tok, CONV, "instruct", tools=TOOLS)
    plain = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in CONV]
    for t in (2, 4, 6):  # each trained turn begins where the prompt that would generate it ends
        prompt = tok.encode(render(plain[:t], tools=TOOLS, add_generation_prompt=True))
        assert ids[:len(prompt)] == prompt
        assert labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE


def test_text_is_the_template_and_trailing_turns_are_cut(tok):
    conv = CONV[:5] + [{"role": "user", "content": "more?"}]  # ends with a user message
    [(ids, labels)] = sft_examples(tok, conv, "instruct", tools=TOOLS)
    no_reasoning = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in conv[:5]]
    assert tok.decode(ids) == render(no_reasoning, tools=TOOLS)
    assert len(ids) == len(labels)


def test_inline_reasoning_is_dropped_for_instruct_and_trained_for_thinking(tok):
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nA"}]
    [(ids, labels)] = sft_examples(tok, conv, "instruct")
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE]) == "A<|im_end|>"
    [(ids, labels)] = sft_examples(tok, conv, "thinking")
    assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE]) == "<think>\nhm\n</think>\n\nA<|im_end|>"


def test_thinking_unfolds_up_to_five_samples(tok):
    conv = []
    for i in range(7):
        conv += [{"role": "user", "content": f"q{i}"},
                 {"role": "assistant", "reasoning_content": f"r{i}", "content": f"a{i}"}]
    samples = sft_examples(tok, conv, "thinking")
    assert spread(7, 5) == [0, 2, 3, 4, 6] and spread(3, 5) == [0, 1, 2] and spread(9, 1) == [8]
    assert len(samples) == 5
    for (ids, labels), t in zip(samples, spread(7, 5)):
        assert tok.decode([i for i, l in zip(ids, labels) if l != IGNORE]) == f"<think>\nr{t}\n</think>\n\na{t}<|im_end|>"
        text = tok.decode(ids)
        assert text.endswith(f"a{t}<|im_end|>\n") and text.count("<think>") == 1  # one trained turn, earlier reasoning dropped
    assert len(sft_examples(tok, conv, "thinking", max_samples=2)) == 2
    assert sft_examples(tok, [m for m in conv if "reasoning_content" not in m] + [
        {"role": "assistant", "content": "x"}], "thinking") == []  # no reasoning: excluded


def test_no_assistant_turn_and_bad_input(tok):
    assert sft_examples(tok, [{"role": "user", "content": "hi"}], "instruct") == []
    with pytest.raises(UsageError, match="mode must be one of instruct, thinking"):
        sft_examples(tok, CONV, "chat")
    with pytest.raises(ChatFormatError, match=r"messages\[1\].role: unknown role 'bot'"):
        sft_examples(tok, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "instruct")
    with pytest.raises(ChatFormatError, match=r"messages\[1\].tool_calls\[0\].function.arguments: expected a JSON object"):
        sft_examples(tok, [{"role": "user", "content": "a"},
                           {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
                     "thinking")
