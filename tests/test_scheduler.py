"""The engine as a scheduler of requests: continuous batching against each request served alone
(plain and speculative; arrivals at different steps, a pool smaller than the load, chunked prefill,
cancels), per-request error isolation, the background driver, prefix caching against no cache, and
logprobs against a full forward's log-softmax."""
import threading

import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.infer import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mellum2(ModelConfig.from_preset("test-small2")).eval()  # window 5, an MTP head


PROMPTS = [[5, 9, 11], list(range(20, 37)), [7] * 9, list(range(40, 70)), [3, 1, 4, 1, 5, 9, 2, 6]]
BUDGETS = [12, 30, 7, 20, 16]


def params(n, **kw):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def alone(model, prompt, p, **kw):
    return Engine(model, **kw).generate([prompt], p)[0]


@pytest.mark.parametrize("spec", [False, True])
def test_continuous_batching_equals_each_request_alone(model, spec):
    """Two rows for five requests (three wait), a 4-token prefill chunk, arrivals over several steps."""
    want = [alone(model, p, params(n)).tokens for p, n in zip(PROMPTS, BUDGETS)]
    eng = Engine(model, max_num_seqs=2, max_model_len=100, prefill_chunk=4, speculative=spec, draft_tokens=2)
    rids = [eng.submit(PROMPTS[0], params(BUDGETS[0])), eng.submit(PROMPTS[1], params(BUDGETS[1]))]
    got: dict[str, list[int]] = {}
    waited = 0
    for step in range(400):
        if step in (2, 5, 9):  # later arrivals join a running batch
            i = len(rids)
            rids.append(eng.submit(PROMPTS[i], params(BUDGETS[i])))
        if not eng.has_work() and len(rids) == 5:
            break
        s = eng.stats()
        assert s["running"] + s["prefilling"] <= 2
        waited = max(waited, s["waiting"])
        for d in eng.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
    assert [got[r] for r in rids] == want
    assert waited >= 1  # the pool was full and requests queued
    s = eng.stats()
    assert s["new_tokens"] == sum(BUDGETS) and s["errors"] == 0 and s["running"] == 0
    if spec:
        assert s["drafted"] > 0


def test_leaving_rows_are_refilled_with_few_copies(model, monkeypatch):
    """Four rows, eight requests of different lengths leaving in the middle of the batch: every stream
    equals its lone run, and a leaving request costs at most one row copy for the decoding rows (the
    last one fills the hole) plus the shift of the rows still prefilling (a 4-token chunk: at most 2)."""
    prompts = PROMPTS + [list(range(80, 92)), [2] * 5, list(range(100, 121))]
    budgets = [25, 3, 14, 6, 30, 9, 4, 18]
    want = [alone(model, p, params(n)).tokens for p, n in zip(prompts, budgets)]
    eng = Engine(model, max_num_seqs=4, max_model_len=100, prefill_chunk=4)
    moves = []
    real = Engine._move
    monkeypatch.setattr(Engine, "_move", lambda self, r, dst: (moves.append((r.state, r.slot, dst)), real(self, r, dst)))
    rids = [eng.submit(p, params(n)) for p, n in zip(prompts, budgets)]
    got: dict[str, list[int]] = {}
    for _ in range(400):
        if not eng.has_work():
            break
        for d in eng.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
    assert [got[r] for r in rids] == want
    dec = [m for m in moves if m[0] == "decode"]
    assert dec and len(dec) <= len(prompts)  # one copy per leaving request at most (the old shift: ~2 each)
    assert len(moves) - len(dec) <= 2 * len(prompts)
    assert all(dst < src for _, src, dst in moves)  # rows only move down into holes


def test_sampled_requests_draw_the_same_tokens_in_any_batch(model):
    ps = [params(n, temperature=0.9, top_k=20, seed=i) for i, n in enumerate(BUDGETS)]
    want = [alone(model, p, sp).tokens for p, sp in zip(PROMPTS, ps)]
    eng = Engine(model, max_num_seqs=3, prefill_chunk=6)
    rids = [eng.submit(p, sp) for p, sp in zip(PROMPTS, ps)]
    res = eng.run_until_done()
    assert [res[r].tokens for r in rids] == want


def test_cancel_ends_one_request(model):
    want = [alone(model, p, params(n)).tokens for p, n in zip(PROMPTS[:3], BUDGETS[:3])]
    eng = Engine(model, max_num_seqs=3)
    rids = [eng.submit(p, params(n)) for p, n in zip(PROMPTS[:3], BUDGETS[:3])]
    waiting = eng.submit(PROMPTS[3], params(10))  # no row for it yet
    got, ends = {r: [] for r in rids}, {}
    for step in range(200):
        if step == 3:
            eng.cancel(rids[1])
            eng.cancel(waiting)
            eng.cancel("no-such-request")  # ignored
        for d in eng.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finished:
                ends[d.request_id] = d.finish_reason
        if not eng.has_work():
            break
    assert got[rids[0]] == want[0] and got[rids[2]] == want[2]
    assert ends == {rids[0]: "length", rids[1]: "cancelled", rids[2]: "length", waiting: "cancelled"}
    assert got[rids[1]] == want[1][:len(got[rids[1]])] and 0 < len(got[rids[1]]) < BUDGETS[1]
    assert got[waiting] == []


def test_a_failing_request_ends_alone(model, monkeypatch):
    """A detokenize callback that raises (stop strings) ends its request with "error"; so does a
    forward pass that fails only on one request's tokens (the batch is rerun row by row)."""
    want = [alone(model, p, params(n)).tokens for p, n in zip(PROMPTS[:3], BUDGETS[:3])]

    def bad_detok(ids):
        raise RuntimeError("detokenizer broke")

    eng = Engine(model)
    ok = [eng.submit(PROMPTS[0], params(BUDGETS[0])), eng.submit(PROMPTS[2], params(BUDGETS[2]))]
    bad = eng.submit(PROMPTS[1], params(BUDGETS[1], stop=("zz",)), detokenize=bad_detok)
    res = eng.run_until_done()
    assert [res[r].tokens for r in ok] == [want[0], want[2]]
    assert res[bad].finish_reason == "error" and "detokenizer broke" in res[bad].error

    trunk = eng.fwd.trunk
    poison = 77  # a token only the bad request's prompt holds

    def flaky(ids_BT, *a, **kw):
        if (ids_BT == poison).any():
            raise RuntimeError("device fault")
        return trunk(ids_BT, *a, **kw)

    monkeypatch.setattr(eng.fwd, "trunk", flaky)
    ok = [eng.submit(p, params(n)) for p, n in zip(PROMPTS[:3], BUDGETS[:3])]
    bad = eng.submit([1, 2, poison, 3], params(5))
    res = eng.run_until_done()
    assert [res[r].tokens for r in ok] == want
    assert res[bad].finish_reason == "error" and "device fault" in res[bad].error
    assert eng.stats()["errors"] == 2


def test_background_driver_streams_to_threads(model):
    want = [alone(model, p, params(n)).tokens for p, n in zip(PROMPTS, BUDGETS)]
    eng = Engine(model, max_num_seqs=3, prefill_chunk=8)
    eng.start()
    try:
        got = [None] * len(PROMPTS)

        def client(i):
            rid = eng.submit(PROMPTS[i], params(BUDGETS[i]))
            toks, last = [], None
            for d in eng.stream(rid):
                toks += d.token_ids
                last = d
            assert last.finished and last.finish_reason == "length"
            got[i] = toks

        ts = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        assert got == want
        # a callback instead of a stream
        seen = []
        done = threading.Event()
        eng.submit(PROMPTS[0], params(BUDGETS[0]), callback=lambda d: (seen.extend(d.token_ids),
                                                                      d.finished and done.set()))
        assert done.wait(60) and seen == want[0]
    finally:
        eng.stop()
    assert not eng.has_work()


def test_bad_submissions_are_named(model):
    eng = Engine(model, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len=64"):
        eng.submit([1] * 60, params(10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.submit([1, 999], params(1))
    rid = eng.submit([1, 2], params(1), request_id="a")
    with pytest.raises(ValueError, match="already in the engine"):
        eng.submit([1, 2], params(1), request_id="a")
    assert rid == "a" and list(eng.run_until_done()) == ["a"]
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(model, max_model_len=10_000)
    with pytest.raises(KeyError, match="no request"):
        eng.stream("a")


# ---------------------------------------------------------------------------- prefix caching
@pytest.mark.parametrize("spec", [False, True])
def test_prefix_cache_output_equals_no_cache(model, spec):
    """A file that grows at every request (the IDE case): each request reuses the KV of the previous
    one's blocks, the sliding layers' rings (window 5) rebuilt from them; output equal to no cache."""
    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, 300, (70,), generator=g).tolist()
    prompts = [text[:n] for n in (23, 31, 32, 50, 70)] + [text[:40] + [9, 9, 9]]
    ref = Engine(model, speculative=spec, draft_tokens=2)
    want = [ref.generate([p], params(10))[0].tokens for p in prompts]
    eng = Engine(model, prefix_cache_tokens=4096, prefix_block=4, speculative=spec, draft_tokens=2,
                 prefill_chunk=16)
    got, cached = [], []
    for p in prompts:
        rid = eng.submit(p, params(10))
        res = eng.run_until_done()[rid]
        got.append(res.tokens)
        cached.append(res.stats.cached_tokens)
    assert got == want
    # the first request computes everything; later ones reuse the previous prompts' whole blocks
    # (minus the position the MTP layer recomputes when speculating)
    d = 1 if spec else 0
    assert cached == [0, 20 - d, 28 - d, 28 - d, 48 - d, 40 - d]
    assert eng.stats()["cached_tokens"] == sum(cached)


def test_prefix_cache_is_bounded_and_cleared_by_new_weights():
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small2")).eval()
    eng = Engine(m, prefix_cache_tokens=40, prefix_block=4)  # 10 blocks
    for s in range(4):
        p = torch.randint(3, 300, (30,), generator=torch.Generator().manual_seed(s)).tolist()
        eng.generate([p], params(2))
        assert len(eng.prefix) <= 10
        # the byte count kept as blocks come and go equals a recount of the blocks held
        assert eng.prefix.nbytes() == sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                                          for b in eng.prefix.blocks.values() for k, v in b.kv) > 0
    assert len(eng.prefix) == 10
    p = torch.randint(3, 300, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    assert eng.generate([p + [5]], params(2))[0].stats.cached_tokens == 28  # the newest prompt's blocks stay
    with torch.no_grad():
        m.lm_head.weight.mul_(1.5)  # the KV stays the same here, but any weight change clears the cache
    r = eng.generate([p + [5]], params(4))[0]
    assert eng.stats()["prefix_cache_bytes"] == sum(k.nbytes + v.nbytes for b in eng.prefix.blocks.values() for k, v in b.kv)
    assert r.stats.cached_tokens == 0 and r.tokens == Engine(m).generate([p + [5]], params(4))[0].tokens


# ---------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("mode", ["raw", "scaled", "processed"])
def test_logprobs_equal_a_full_forward(model, mode):
    """Sampled tokens' logprobs, in a batch, against log_softmax of one full forward over prompt +
    output: raw logits, logits / temperature, or the top-k distribution the token was drawn from."""
    T, K = 0.7, 5
    ps = [params(n, temperature=T, top_k=K, seed=i, logprobs=True, logprobs_mode=mode)
          for i, n in enumerate(BUDGETS[:3])]
    res = Engine(model, prefill_chunk=5).generate(PROMPTS[:3], ps)
    for p, r in zip(PROMPTS[:3], res):
        with torch.no_grad():
            logits = model(torch.tensor([p + r.tokens])).logits[0, len(p) - 1:-1].float()
        if mode == "scaled":
            logits = logits / T
        elif mode == "processed":
            logits = logits / T
            kth = logits.topk(K, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        want = logits.log_softmax(-1).gather(-1, torch.tensor(r.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs), want, rtol=1e-4, atol=1e-4)


def test_speculative_logprobs_equal_plain(model):
    p = [params(n, temperature=0.8, seed=i, logprobs=True, logprobs_mode="scaled") for i, n in enumerate(BUDGETS)]
    spec = Engine(model, speculative=True, draft_tokens=2).generate(PROMPTS, p)
    for pr, r in zip(PROMPTS, spec):
        with torch.no_grad():
            logits = model(torch.tensor([pr + r.tokens])).logits[0, len(pr) - 1:-1].float() / 0.8
        want = logits.log_softmax(-1).gather(-1, torch.tensor(r.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs), want, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_does_not_stall_running_streams(model):
    """A 100-token prompt arriving while a stream decodes is prefilled 8 tokens a step; the running
    stream gets a token at every one of those steps, and both outputs equal their alone runs."""
    long_prompt = torch.randint(3, 300, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    want = [alone(model, PROMPTS[0], params(40)).tokens, alone(model, long_prompt, params(5)).tokens]
    eng = Engine(model, max_num_seqs=4, prefill_chunk=8)
    a = eng.submit(PROMPTS[0], params(40))
    got = {a: []}
    for _ in range(3):
        for d in eng.step():
            got[d.request_id] += d.token_ids
    b = eng.submit(long_prompt, params(5))
    got[b] = []
    steps = 0
    while not got[b]:
        ds = eng.step()
        steps += 1
        assert any(d.request_id == a and d.token_ids for d in ds)  # the stream kept going
        for d in ds:
            got[d.request_id] += d.token_ids
    assert steps == 100 // 8 + 1
    for d in eng.run_until_done().values():
        pass
    assert eng.stats()["running"] == 0


def test_an_abandoned_generate_call_frees_the_engine(model):
    eng = Engine(model)
    run = eng.stream(PROMPTS[:2], params(20))
    next(iter(run))
    run._it.close()  # what a break or an exception in the caller's loop does
    assert not eng.has_work()
    r = eng.generate([PROMPTS[0]], params(12), speculative=True, draft_tokens=2)[0]  # a new mode: allowed
    assert r.tokens == alone(model, PROMPTS[0], params(12)).tokens


def test_stream_without_the_driver_steps_the_engine(model):
    want = [alone(model, p, params(n)).tokens for p, n in zip(PROMPTS[:2], BUDGETS[:2])]
    eng = Engine(model, max_num_seqs=4)
    a, b = eng.submit(PROMPTS[0], params(BUDGETS[0])), eng.submit(PROMPTS[1], params(BUDGETS[1]))
    it = eng.stream(a)
    first = next(it)
    s = eng.stats()
    assert s["running"] == 2 and s["kv_slots_used"] == 2 and 0 < s["kv_use"] < 1
    assert first.token_ids + [t for d in it for t in d.token_ids] == want[0]
    # b ran alongside: its stream starts with what it emitted so far
    assert [t for d in eng.stream(b) for t in d.token_ids] == want[1]
