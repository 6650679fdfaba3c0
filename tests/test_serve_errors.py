"""Hardening of `mellum2 serve`: every bad request gets its status and OpenAI's error JSON while the
server keeps serving (bad requests fired between good ones), the API key, a full queue (503 +
Retry-After), a client that disconnects mid-stream frees its slot, a failure inside one request ends
that request only."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

GOOD = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}

# (path, body (raw bytes or an object), status, a word the message must hold)
BAD = [
    ("/v1/completions", b"{not json", 400, "JSON"),
    ("/v1/completions", b"", 400, "JSON"),
    ("/v1/completions", b"\xff\xfe", 400, "JSON"),
    ("/v1/completions", [1, 2], 400, "object"),
    ("/v1/completions", {**GOOD, "max_tokens": "4"}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {**GOOD, "prompt": {"text": "x"}}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1, 99999]}, 400, "vocabulary"),
    ("/v1/completions", {**GOOD, "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": "x " * 600, "max_tokens": 600}, 400, "maximum context length"),
    ("/v1/completions", {**GOOD, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "n": 17}, 400, "n"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n"),
    ("/v1/completions", {**GOOD, "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {**GOOD, "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {**GOOD, "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ("/v1/completions", {**GOOD, "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {**GOOD, "prompt": [1, 2], "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "gpt-4"),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "nope"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "<|im_start|>x"}]}, 400, "control"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "retrieval"}]}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"enable_thinking": "no"}}, 400, "enable_thinking"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {**CHAT, "functions": []}, 400, "functions"),
    ("/v1/nothing", GOOD, 404, "Not Found"),
]


def post(url, path, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=data, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                      timeout=60, **kw)


def assert_error(r, status, word):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert word.lower() in err["message"].lower(), err


def good(url, chat=True):
    r = post(url, "/v1/completions", GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop"), r.text
    if not chat:
        return
    r = post(url, "/v1/chat/completions", CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text


def test_every_bad_request_between_good_ones(make_server):
    srv = make_server()
    good(srv.url)
    for i, (path, body, status, word) in enumerate(BAD):
        assert_error(post(srv.url, path, body), status, word)
        good(srv.url, chat=i % 4 == 0)
    assert_error(httpx.get(srv.url + "/v1/completions"), 405, "not allowed")
    r = post(srv.url, "/v1/completions", {**GOOD, "prompt": "x " * 600, "max_tokens": 600})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert 'mellum2:http_errors_total{status="400"}' in httpx.get(srv.url + "/metrics").text


def test_api_key(make_server):
    srv = make_server(api_key="s3cret")
    assert_error(post(srv.url, "/v1/completions", GOOD), 401, "API key")
    assert_error(post(srv.url, "/v1/completions", GOOD, headers={"Authorization": "Bearer wrong"}), 401, "API key")
    assert_error(httpx.get(srv.url + "/v1/models"), 401, "API key")
    r = post(srv.url, "/v1/completions", GOOD, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert httpx.get(srv.url + "/health").status_code == 200  # health and the page stay open
    assert httpx.get(srv.url + "/").status_code == 200


def _blocked(srv):
    """Hold the engine's worker before its next batch until the returned event is set."""
    gate, entered = threading.Event(), threading.Event()

    def fault(handles):
        entered.set()
        gate.wait(30)

    srv.state.backend.fault = fault
    return gate, entered


def test_full_queue_is_503_with_retry_after(make_server):
    srv = make_server(max_num_seqs=1, max_waiting=1, mode="static")
    gate, entered = _blocked(srv)
    results = []
    t1 = threading.Thread(target=lambda: results.append(post(srv.url, "/v1/completions", GOOD)))
    t1.start()
    assert entered.wait(30)  # the first request runs (held), the queue is empty
    t2 = threading.Thread(target=lambda: results.append(post(srv.url, "/v1/completions", GOOD)))
    t2.start()
    t0 = time.time()
    while srv.state.backend.stats()["waiting"] < 1 and time.time() - t0 < 30:
        time.sleep(0.02)
    r = post(srv.url, "/v1/completions", GOOD)  # running 1 + waiting 1: full
    assert_error(r, 503, "overloaded")
    assert r.headers["Retry-After"] == "1"
    srv.state.backend.fault = None
    gate.set()
    t1.join(60)
    t2.join(60)
    assert [x.status_code for x in results] == [200, 200]
    good(srv.url)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(make_server, stream):
    srv = make_server(max_num_seqs=2)
    body = {**GOOD, "max_tokens": 900, "stream": stream, "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        if stream:
            with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert any(x.startswith("data: ") for x in got)
        else:
            with pytest.raises(httpx.TimeoutException):
                c.post(srv.url + "/v1/completions", json=body, timeout=0.5)
    t0 = time.time()
    while srv.state.backend.stats()["running"] and time.time() - t0 < 20:
        time.sleep(0.05)
    assert srv.state.backend.stats()["running"] == 0
    assert time.time() - t0 < 10  # well before 900 tokens would have been generated
    text = httpx.get(srv.url + "/metrics").text
    assert 'finished_reason="abort"' in text
    good(srv.url)


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_a_failing_request_ends_alone(make_server, mode):
    """One request fails in the backend while others wait or run with it (static: in the same
    batch, which is then replayed one request at a time): only it gets an error."""
    srv = make_server(max_num_seqs=4, mode=mode)
    gate, entered = _blocked(srv)
    poison = [0, 9, 9, 9, 9]
    results = {}

    def run(name, body):
        results[name] = post(srv.url, "/v1/completions", body)

    blocker = threading.Thread(target=run, args=("first", GOOD))
    blocker.start()
    assert entered.wait(30)

    def fault(handles):  # the poisoned prompt makes any batch holding it raise
        if any(h.prompt_ids == poison for h in handles):
            raise RuntimeError("poisoned request")

    threads = [threading.Thread(target=run, args=(n, b)) for n, b in
               (("bad", {**GOOD, "prompt": poison, "max_tokens": 8}), ("ok", {**GOOD, "max_tokens": 8}))]
    for t in threads:
        t.start()
    t0 = time.time()
    while srv.state.backend.stats()["waiting"] < 2 and time.time() - t0 < 30:
        time.sleep(0.02)
    srv.state.backend.fault = fault
    gate.set()
    for t in [blocker, *threads]:
        t.join(60)
    assert results["first"].status_code == 200
    assert results["ok"].status_code == 200 and results["ok"].json()["choices"][0]["text"] == \
        post(srv.url, "/v1/completions", {**GOOD, "max_tokens": 8}).json()["choices"][0]["text"]
    assert_error(results["bad"], 500, "poisoned")
    good(srv.url)


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_failure_ends_that_request_only(make_server, serve_model, stream):
    """The continuous engine: one request's stop-string check raises inside the engine (its
    detokenize callback) while another runs in the same batch; the first gets a 500 (or an error
    event), the second its full, correct output."""
    from mellum2 import generate
    from mellum2.serve.server import make_engine

    _, m, tok = serve_model

    def boom(ids):
        raise RuntimeError("detokenizer exploded")

    srv = make_server(engine=make_engine(m, max_num_seqs=4, max_model_len=1024, detokenize=boom))
    assert srv.state.backend.mode == "continuous"
    results = {}
    bad = {**GOOD, "max_tokens": 30, "stop": ["zzz"], "stream": stream}
    ok = {**GOOD, "max_tokens": 30, "ignore_eos": True}
    threads = [threading.Thread(target=lambda n=n, b=b: results.__setitem__(n, post(srv.url, "/v1/completions", b)))
               for n, b in (("bad", bad), ("ok", ok))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ref = generate(m, [tok.bos_id] + tok.encode(GOOD["prompt"]), max_new_tokens=30, ignore_eos=True)
    assert results["ok"].status_code == 200
    assert results["ok"].json()["choices"][0]["text"] == tok.decode([t for t in ref.tokens if t != tok.eos_id])
    if stream:
        events = [x[6:] for x in results["bad"].text.split("\n\n") if x.startswith("data: ")]
        assert events[-1] == "[DONE]" and "detokenizer exploded" in json.loads(events[-2])["error"]["message"]
    else:
        assert_error(results["bad"], 500, "detokenizer exploded")
    good(srv.url)
