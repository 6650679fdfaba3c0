"""`mellum2 serve` through the official `openai` client against a real uvicorn server on a random
port (conftest.py: make_server), with a tiny random-weight model: greedy output equals
mellum2.generate (plain, MTP speculative, a prefix served before), streaming equals non-streaming,
FIM via `suffix` equals mellum2.infer.fim.complete, logprobs equal the engine's, chat replies equal
the parsed greedy decode of the rendered prompt; tool calls and reasoning through a scripted engine
(a random model writes neither)."""
from __future__ import annotations

import json

import openai
import pytest
import torch

from mellum2 import generate
from mellum2.chat import apply_delta, parse, render
from mellum2.infer.fim import complete

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

PROMPT = "def add(a, b):\n    return"
LONG_PROMPT = "for i in range(10):\n    print(i)\n\nclass Stack:\n    pass\n\n" + PROMPT


def client(srv, key="none"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def want_text(tok, res, hide=(28,)):
    return tok.decode([t for t in res.tokens if t not in hide])


@pytest.mark.parametrize("mode,speculative", [("continuous", False), ("continuous", True), ("static", False),
                                              ("static", True)])
def test_greedy_completion_equals_generate(make_server, serve_model, mode, speculative):
    _, m, tok = serve_model
    srv = make_server(speculative=speculative, mode=mode)
    assert srv.state.backend.mode == mode and srv.state.backend.speculative == speculative
    c = client(srv)
    prompt = LONG_PROMPT
    ids = [tok.bos_id] + tok.encode(prompt)
    ref = generate(m, ids, max_new_tokens=24)
    for _ in range(2):  # the second time the prompt is a cached prefix (with a prefix-caching engine)
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == want_text(tok, ref)
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.tokens)
    # a longer prompt that shares the first one as its prefix, as an IDE sends again and again
    longer = prompt + " a + b\n\ndef sub(a, b):\n"
    ref2 = generate(m, [tok.bos_id] + tok.encode(longer), max_new_tokens=24)
    r = c.completions.create(model="tiny", prompt=longer, max_tokens=24, temperature=0)
    assert r.choices[0].text == want_text(tok, ref2)
    if speculative:
        assert srv.state.backend.stats()["drafted"] > 0
    if mode == "continuous":  # the repeated and the longer prompt reused the cached KV of their prefix
        assert srv.state.backend.stats()["engine"]["cached_tokens"] >= 2 * 16  # two requests, >= a block each


def test_streaming_equals_non_streaming_and_usage(make_server, serve_model):
    _, m, tok = serve_model
    c = client(make_server())
    full = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(c.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) > 1  # it did stream
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_token_prompts_n_and_seeded_sampling(make_server, serve_model):
    _, m, tok = serve_model
    c = client(make_server())
    ids = [tok.bos_id] + tok.encode(PROMPT)
    ref = generate(m, ids, max_new_tokens=10)
    r = c.completions.create(model="tiny", prompt=[ids, ids], max_tokens=10, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert all(ch.text == want_text(tok, ref) for ch in r.choices)
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, top_k=50, seed=7)
    a = c.completions.create(**{k: v for k, v in kw.items() if k != "top_k"}, extra_body={"top_k": 50}, n=2)
    b = c.completions.create(**{k: v for k, v in kw.items() if k != "top_k"}, extra_body={"top_k": 50}, n=2)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]  # a seed makes sampling reproducible
    assert a.choices[0].text != a.choices[1].text  # choice j samples with seed + j
    ref_s = generate(m, ids, max_new_tokens=12, temperature=1.0, top_k=50, seed=7)
    assert a.choices[0].text == want_text(tok, ref_s)


def test_fim_via_suffix_equals_complete(make_server, serve_model):
    _, m, tok = serve_model
    c = client(make_server())
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    ref = complete(m, tok, prefix, suffix, max_new_tokens=16, heal=False)  # the server, as vLLM, does not heal
    r = c.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=16, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason


def test_logprobs_equal_the_engine(make_server, serve_model):
    _, m, tok = serve_model
    c = client(make_server())
    ids = [tok.bos_id] + tok.encode(PROMPT)
    ref = generate(m, ids, max_new_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=3)
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert lp.tokens == [tok.decode([t]) for t in ref.tokens]
    assert len(lp.top_logprobs) == 8 and all(len(d) <= 3 for d in lp.top_logprobs)
    assert max(lp.top_logprobs[0].values()) == pytest.approx(ref.top_logprobs[0][0][1], abs=1e-5)
    msgs = [{"role": "user", "content": "Hi"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    pids = tok.encode(render(msgs, add_generation_prompt=True))
    ref = generate(m, pids, max_new_tokens=6, ignore_eos=True, logprobs=True)
    assert [x.logprob for x in content] == pytest.approx(ref.logprobs, abs=1e-5)
    assert all(len(x.top_logprobs) == 2 for x in content)


@pytest.mark.parametrize("think", [True, False])
def test_chat_greedy_equals_parsed_generate(make_server, serve_model, think):
    _, m, tok = serve_model
    c = client(make_server(speculative=True))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    pids = tok.encode(render(msgs, add_generation_prompt=True, enable_thinking=think))
    ref = generate(m, pids, max_new_tokens=20, stop_token_ids=(tok.eot_id, tok.im_start_id))
    want = parse(tok.decode([t for t in ref.tokens if t not in (tok.eos_id, tok.eot_id, tok.im_start_id)]))
    kw = dict(model="tiny", messages=msgs, max_tokens=20, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": think}})
    r = c.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert (msg.content or "") == want["content"]
    assert getattr(msg, "reasoning_content", None) == want["reasoning_content"]
    got = {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": []}
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    for ch in chunks:
        for choice in ch.choices:
            apply_delta(got, choice.delta.model_dump(exclude_none=True))
    assert got["content"] == (msg.content or "") and got["reasoning_content"] == want["reasoning_content"]
    assert chunks[-1].usage.prompt_tokens == len(pids)


# ------------------------------------------------------------------ tool calls and reasoning, scripted
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_tool_calls_and_reasoning_message_and_stream(make_server, serve_model, scripted_engine):
    _, m, tok = serve_model
    text = ('<think>\nThe user wants the weather.\n</think>\n\nLet me check.\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
    srv = make_server(engine=scripted_engine(tok, text))
    c = client(srv)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, max_tokens=100)
    r = c.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content == "Let me check."
    assert ch.message.reasoning_content == "The user wants the weather."
    [call] = ch.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # the tools reached the prompt
    assert '"name": "get_weather"' in tok.decode(srv.state.backend.engine.prompts[-1])
    got = {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": []}
    finish, arg_pieces = None, 0
    for chunk in c.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            d = choice.delta.model_dump(exclude_none=True)
            arg_pieces += sum(1 for tc in d.get("tool_calls", []) if tc.get("function", {}).get("arguments"))
            apply_delta(got, d)
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and arg_pieces > 1  # arguments arrive incrementally
    assert got["content"] == "Let me check." and got["reasoning_content"] == "The user wants the weather."
    [tc] = got["tool_calls"]
    assert tc["id"].startswith("call_") and tc["function"]["name"] == "get_weather"
    assert json.loads(tc["function"]["arguments"]) == {"city": "Paris"}


def test_named_and_required_tool_choice_force_a_call(make_server, serve_model, scripted_engine):
    _, m, tok = serve_model
    eng = scripted_engine(tok, '{"a": 1, "b": 2}}\n</tool_call><|im_end|>')
    c = client(make_server(engine=eng))
    msgs = [{"role": "user", "content": "1 + 2?"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=50,
                                  tool_choice={"type": "function", "function": {"name": "add"}})
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 1, "b": 2}
    assert r.choices[0].finish_reason == "tool_calls"
    assert tok.decode(eng.prompts[-1]).endswith('<tool_call>\n{"name": "add", "arguments": ')
    eng.text = 'get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    r = c.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=50, tool_choice="required")
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    r = c.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=50, tool_choice="none")
    assert '"name": "get_weather"' not in tok.decode(eng.prompts[-1])  # no tools in the prompt


def test_models_health_metrics(make_server):
    srv = make_server()
    c = client(srv)
    assert [x.id for x in c.models.list().data] == ["tiny"]
    c.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    import httpx
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["running"] == 0
    text = httpx.get(srv.url + "/metrics").text
    for name in ("mellum2:num_requests_running", "mellum2:num_requests_waiting", "mellum2:time_to_first_token_seconds",
                 "mellum2:inter_token_latency_seconds", "mellum2:generation_tokens_per_second",
                 "mellum2:spec_decode_acceptance_rate", "mellum2:kv_cache_usage_perc"):
        assert name in text
    assert 'mellum2:request_success_total{finished_reason="length"} 1.0' in text
