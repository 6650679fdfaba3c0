"""The engine in its own process (serve/engine_process.py, `mellum2 serve`'s default): the same tokens
as the engine in this process, through the scheduler's API and through the HTTP server; a refused
request ends alone; a dead engine process is named, not waited for."""
import contextlib
import os
import signal

import httpx
import pytest
import torch

from mellum2 import generate
from mellum2.infer import Engine, SamplingParams
from mellum2.serve.engine_process import EngineProcessError, ProcessEngine

OPTIONS = dict(max_num_seqs=3, max_model_len=256, prefill_chunk=16)


@pytest.fixture(scope="module")
def engine(serve_model):
    d, _, _ = serve_model
    pe = ProcessEngine(d, torch.float32, d, OPTIONS, threads=1)
    yield pe
    pe.close()


@contextlib.contextmanager
def _served(serve_model, rows: int):
    """A ThreadedServer over a fresh engine process of `rows` rows: (server, engine)."""
    from mellum2.serve.app import build_app
    from mellum2.serve.server import ThreadedServer, make_state

    d, _, tok = serve_model
    pe = ProcessEngine(d, torch.float32, d, {"max_num_seqs": rows}, threads=1)
    state = make_state(pe.model_stub(), tok, name="tiny", max_num_seqs=rows, engine=pe)
    try:
        with ThreadedServer(build_app(state)) as srv:
            yield srv, pe
    finally:
        state.backend.close()
        pe.close()


def _drain(pe, rids):
    got, errors, left = {r: [] for r in rids}, {}, set(rids)
    for _ in range(2000):
        if not left:
            break
        for d in pe.step():
            got[d.request_id] += d.token_ids
            if d.error:
                errors[d.request_id] = d.error
            if d.finished:
                left.discard(d.request_id)
    assert not left, f"requests {left} never finished"
    return got, errors


def test_same_tokens_as_the_engine_in_this_process(serve_model, engine, one_thread):
    _, m, _ = serve_model
    prompts = [[5, 9, 11], list(range(20, 57)), [7] * 9, list(range(40, 70)), [3, 1, 4, 1, 5]]
    budgets = [12, 20, 7, 15, 9]
    want = Engine(m, **OPTIONS).generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in budgets])
    rids = [engine.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True), request_id=f"r{i}")
            for i, (p, n) in enumerate(zip(prompts, budgets))]
    got, errors = _drain(engine, rids)
    assert not errors
    assert [got[r] for r in rids] == [w.tokens for w in want]
    assert engine.stats()["new_tokens"] >= sum(budgets) and engine.stats()["running"] == 0
    assert engine.model_stub().cfg.vocab_size == m.cfg.vocab_size


def test_a_refused_request_ends_alone(engine):
    ok = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4, ignore_eos=True), request_id="ok")
    bad = engine.submit([5, 10_000], SamplingParams(max_new_tokens=4), request_id="bad")
    got, errors = _drain(engine, [ok, bad])
    assert list(errors) == ["bad"] and "outside the vocabulary" in errors["bad"]
    assert len(got["ok"]) == 4


def test_server_over_the_engine_process_equals_generate(serve_model):
    _, m, tok = serve_model
    with _served(serve_model, 4) as (srv, _):
        prompt = tok.encode("def add(a, b):\n")
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                                            "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        want = generate(m, torch.tensor(prompt), 12, ignore_eos=True).tokens
        assert r.json()["choices"][0]["text"] == tok.decode(want)
        assert r.json()["usage"]["completion_tokens"] == 12


def test_a_dead_engine_process_is_named(serve_model):
    with _served(serve_model, 2) as (srv, pe):
        assert httpx.get(srv.url + "/health").status_code == 200
        os.kill(pe.proc.pid, signal.SIGKILL)
        pe.proc.join(10)
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and "not running" in h.json()["error"]
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 2},
                       timeout=30)
        assert r.status_code >= 500 and "engine" in r.text  # named, not a hang
        with pytest.raises(EngineProcessError, match="stopped"):
            pe.submit([5, 6], SamplingParams(max_new_tokens=2), request_id="x")
            pe.step()


def test_a_checkpoint_that_cannot_load_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EngineProcessError, match="could not start"):
        ProcessEngine(tmp_path, torch.float32, tmp_path, {})
