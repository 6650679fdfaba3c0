"""`mellum2 chat`: a tiny random model driven through stdin (/system, /reset, --no-think, the greedy
reply equals plain greedy decoding of the rendered prompt, MTP speculation when the model has a
head), and the display of reasoning, answer and tool calls from a scripted engine."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.chat import parse, render
from mellum2.chat import cli
from mellum2.infer import Delta, Result, SamplingParams, Stats
from mellum2.tokenizer import train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
TEXTS = ["Hello! How can I help you today?\n", "def add(a, b):\n    return a + b\n", "The answer is 42.\n"] * 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "model"
    tok = train_bpe(TEXTS, 320)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("test-small", vocab_size=320, max_position_embeddings=512, eos_token_id=28)
    m = Mellum2(cfg).eval()
    m.save_pretrained(d)
    tok.save(d)
    return d, m, tok


def greedy(m, ids, n, stops):
    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(n):
            t = int(m(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            new.append(t)
            if t in stops:
                break
    return new


def open_chat(d, *extra):
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(["--model", str(d), "--temperature", "0", "--max-new-tokens", "10", *extra])
    return cli.open_chat(args, out=out, err=err), out, err


@pytest.mark.parametrize("think", [True, False])
def test_reply_is_the_greedy_decode_of_the_rendered_prompt(ckpt, think):
    d, m, tok = ckpt
    chat, out, err = open_chat(d, "--think" if think else "--no-think")
    assert chat.speculative  # the model has an MTP head: speculation on by default
    msg = chat.say("Hello")
    prompt = render([{"role": "user", "content": "Hello"}], add_generation_prompt=True, enable_thinking=think)
    assert tok.decode(chat.last_prompt_ids) == prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") != think
    new = greedy(m, chat.last_prompt_ids, 10, {tok.eos_id, tok.eot_id, tok.im_start_id})
    want = parse(tok.decode(new))
    assert msg == want
    assert chat.history[-1] == cli._for_history(want)
    assert "MTP acceptance" in err.getvalue()  # speculative greedy == plain greedy, checked above


def test_stdin_session_with_commands(ckpt, monkeypatch, capsys):
    d, _, tok = ckpt
    seen = []
    real = cli.Chat.reply

    def spy(self):
        seen.append(tok.decode(tok.encode(render(self.messages, add_generation_prompt=True, enable_thinking=self.think))))
        return real(self)

    monkeypatch.setattr(cli.Chat, "reply", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        "first\n/system You are Mellum 2.\nsecond\n/reset\n/no-think\nthird\n/bogus\n/tool x\n/quit\nnever sent\n"))
    assert cli.main(["--model", str(d), "--temperature", "0", "--max-new-tokens", "4", "--no-speculative"]) == 0
    out = capsys.readouterr().out
    assert "plain decoding" in out
    for note in ("(system prompt set)", "(conversation cleared)", "(thinking off)", "(commands: /reset",
                 "(no tool call is waiting for an answer)"):
        assert note in out
    assert len(seen) == 3
    assert seen[0] == "<|im_start|>user\nfirst<|im_end|>\n<|im_start|>assistant\n"
    assert seen[1].startswith("<|im_start|>system\nYou are Mellum 2.<|im_end|>\n<|im_start|>user\nfirst<|im_end|>\n")
    assert seen[1].endswith("<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n")
    assert seen[2] == ("<|im_start|>system\nYou are Mellum 2.<|im_end|>\n<|im_start|>user\nthird<|im_end|>\n"
                       "<|im_start|>assistant\n<think>\n\n</think>\n\n")  # reset kept the system prompt
    assert "never sent" not in "".join(seen)


class Scripted:
    """Stands in for Engine: each stream() call plays the next scripted reply, token by token."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.prompts = tok, list(replies), []

    def stream(self, prompts, params, speculative=False, draft_tokens=1, detokenize=None):
        self.prompts.append(prompts[0])
        ids = self.tok.encode(self.replies.pop(0))
        res = Result(tokens=ids, finish_reason="stop", stats=Stats(new_tokens=len(ids)))

        class Gen:
            results, stats = [res], res.stats

            def __iter__(self):
                return (Delta(row=0, tokens=[t]) for t in ids)
        return Gen()


def test_display_of_reasoning_answer_and_tool_calls(ckpt):
    _, _, tok = ckpt
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    replies = ['<think>\nI need the weather.\n</think>\n\nLet me check.\n<tool_call>\n'
               '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
               '<think>\nIt is 18.\n</think>\n\nIt is 18 C in Paris.<|im_end|>']
    out = io.StringIO()
    chat = cli.Chat(Scripted(tok, replies), tok, SamplingParams(max_new_tokens=64), 4096, tools=tools, out=out,
                    err=io.StringIO())
    chat.say("Weather in Paris?")
    assert out.getvalue() == ('[thinking]\nI need the weather.\n[answer]\nLet me check.\n'
                              '[tool call] get_weather {"city": "Paris"}\n(answer the call with /tool RESULT)\n')
    assert chat.pending and chat.history[-1]["tool_calls"][0]["function"]["name"] == "get_weather"
    out.truncate(0), out.seek(0)
    chat.command("/tool 18 C, sunny")  # the last answer: the model goes on by itself
    assert out.getvalue() == "[thinking]\nIt is 18.\n[answer]\nIt is 18 C in Paris.\n"
    assert [mm["role"] for mm in chat.history] == ["user", "assistant", "tool", "assistant"]
    second = tok.decode(chat.engine.prompts[1])
    assert second.endswith("<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert "<think>\nI need the weather.\n</think>" in second  # reasoning of the tool chain is kept


def test_errors_through_the_dispatcher(ckpt, tmp_path, capsys):
    from mellum2.cli import main as dispatch
    d, _, _ = ckpt
    (tmp_path / "tools.json").write_text(json.dumps([{"description": "no name"}]))
    assert dispatch(["chat", "--model", str(d), "--tools", str(tmp_path / "tools.json")]) == 1
    assert "mellum2 chat: error: tools[0]: expected" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[{")
    assert dispatch(["chat", "--model", str(d), "--tools", str(tmp_path / "bad.json")]) == 2
    assert "mellum2 chat: error: --tools" in capsys.readouterr().err
    assert dispatch(["chat", "--model", str(tmp_path / "nothing")]) == 2
    assert "mellum2 chat: error: --model" in capsys.readouterr().err
    assert dispatch(["chat", "--model", str(d), "--top-p", "2"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_a_conversation_longer_than_the_context_is_refused(ckpt):
    _, _, tok = ckpt
    out = io.StringIO()
    chat = cli.Chat(Scripted(tok, ["ok<|im_end|>"]), tok, SamplingParams(max_new_tokens=64), 24, out=out,
                    err=io.StringIO())
    assert chat.say("a long message that does not fit in twenty-four tokens, not at all") is None
    assert "fills the model's context of 24: /reset to start over" in out.getvalue()
    assert chat.history == [] and chat.engine.prompts == []
    assert chat.say("hi") == {"role": "assistant", "content": "ok", "reasoning_content": None, "tool_calls": [],
                              "errors": []}
