"""The engine against the obvious decoder (the model's full forward over the whole sequence, argmax),
plus stop handling, logprobs, streaming, seeds, the public API and bad input."""
import copy

import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.infer import Engine, SamplingParams, generate, generate_stream


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mellum2(ModelConfig.from_preset("test-small2")).eval()


def naive_greedy(m, prompt, n):
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = m(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
            lps.append(float(logits.log_softmax(-1)[ids[-1]]))
    return ids[len(prompt):], lps


PROMPTS = [[5, 9, 11], list(range(20, 37)), [7] * 9]  # ragged; the long one wraps the window (5)


@pytest.mark.parametrize("fast,chunk", [(True, 1024), (False, 1024), (True, 4)])
def test_greedy_batch_equals_naive_decoding(model, fast, chunk):
    eng = Engine(model, fast=fast, prefill_chunk=chunk)
    res = eng.generate(PROMPTS, SamplingParams(max_new_tokens=25, ignore_eos=True, logprobs=True))
    for p, r in zip(PROMPTS, res):
        toks, lps = naive_greedy(model, p, 25)
        assert r.tokens == toks
        assert r.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(lps), rtol=1e-4, atol=1e-4)
    s = res[0].stats
    assert s.new_tokens == 75 and s.prompt_tokens == sum(map(len, PROMPTS)) and s.decode_tokens == 72


def test_stop_tokens_and_eos(model):
    toks, _ = naive_greedy(model, PROMPTS[1], 20)
    stop = toks[6]
    first = toks.index(stop)
    r = generate(model, PROMPTS[1], 20, stop=[stop], ignore_eos=True)
    assert r.tokens == toks[: first + 1] and r.finish_reason == "stop" and r.stop == stop
    # the model's eos ids stop by default (test-small2: eos [1, 2]); simulate by making one the stop id
    eng = Engine(model)
    eng.cfg = model.cfg.replace(eos_token_id=[stop])
    r = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=20))[0]
    assert r.tokens == toks[: first + 1] and r.finish_reason == "stop"
    r = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert r.tokens == toks


def test_stop_strings_with_a_detokenizer(model):
    detok = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731  one letter per token
    toks, _ = naive_greedy(model, PROMPTS[0], 30)
    text = detok(toks)
    target = text[7:10]  # a string spanning three tokens
    end = text.index(target) + len(target)
    r = generate(model, PROMPTS[0], 30, stop=[target], detokenize=detok, ignore_eos=True)
    assert r.tokens == toks[:end] and r.finish_reason == "stop" and r.stop == target


def test_budget_and_zero_tokens(model):
    r = generate(model, PROMPTS[0], 0)
    assert r.tokens == [] and r.finish_reason == "length"
    r = generate(model, PROMPTS[0], 1, ignore_eos=True)
    assert len(r.tokens) == 1 and r.finish_reason == "length"


def test_per_row_params_in_one_batch(model):
    eng = Engine(model)
    params = [SamplingParams(max_new_tokens=5, ignore_eos=True), SamplingParams(max_new_tokens=12, ignore_eos=True),
              SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, ignore_eos=True)]
    res = eng.generate(PROMPTS, params)
    assert [len(r.tokens) for r in res] == [5, 12, 8]
    assert res[0].tokens == naive_greedy(model, PROMPTS[0], 5)[0]
    assert res[1].tokens == naive_greedy(model, PROMPTS[1], 12)[0]
    alone = eng.generate([PROMPTS[2]], params[2])[0]
    assert alone.tokens == res[2].tokens  # a seeded row draws the same tokens in any batch


def test_streaming_matches_generate(model):
    eng = Engine(model)
    params = SamplingParams(max_new_tokens=15, temperature=0.8, top_k=10, seed=4, ignore_eos=True)
    run = eng.stream(PROMPTS, params)
    got = [[] for _ in PROMPTS]
    for d in run:
        got[d.row] += d.tokens
    assert got == [r.tokens for r in run.results]
    assert got == [r.tokens for r in eng.generate(PROMPTS, params)]
    s = generate_stream(model, PROMPTS[0], 15, temperature=0.8, top_k=10, seed=4, ignore_eos=True)
    assert list(s) == got[0] and s.result.tokens == got[0]


def test_public_api_shapes(model):
    r = generate(model, torch.tensor(PROMPTS[0]), 4, ignore_eos=True)
    assert isinstance(r.tokens, list) and len(r.tokens) == 4
    assert hasattr(r.stats, "drafted") and hasattr(r.stats, "accepted")
    rs = generate(model, [PROMPTS[0], PROMPTS[1]], 4, ignore_eos=True)
    assert isinstance(rs, list) and len(rs) == 2 and rs[0].tokens == r.tokens


def test_engine_rereads_weights_after_training(model):
    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    before = generate(m, PROMPTS[0], 6, ignore_eos=True).tokens
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # in place, as an optimizer step
    after = generate(m, PROMPTS[0], 6, ignore_eos=True).tokens
    assert after == naive_greedy(m, PROMPTS[0], 6)[0]
    assert isinstance(before, list)


def test_engine_rereads_replaced_parameters_and_modules():
    """A new Parameter object or a swapped layer (not an in-place update) is seen by the next call, and
    an in-place update of the new Parameter after that as well."""
    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    generate(m, PROMPTS[0], 4, ignore_eos=True)
    o = m.model.layers[1].self_attn.o_proj
    o.weight = torch.nn.Parameter(torch.randn_like(o.weight))
    assert generate(m, PROMPTS[0], 6, ignore_eos=True).tokens == naive_greedy(m, PROMPTS[0], 6)[0]
    with torch.no_grad():
        o.weight.mul_(-1.0)
    assert generate(m, PROMPTS[0], 6, ignore_eos=True).tokens == naive_greedy(m, PROMPTS[0], 6)[0]
    old = m.model.layers[2].self_attn.q_proj
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    m.model.layers[2].self_attn.q_proj = new
    assert generate(m, PROMPTS[0], 6, ignore_eos=True).tokens == naive_greedy(m, PROMPTS[0], 6)[0]


@pytest.mark.parametrize("prompts,params,kw,msg", [
    ([[]], None, {}, "prompt 0 is empty"),
    ([[1, 5000]], None, {}, "outside the vocabulary"),
    ([[1, 2]], SamplingParams(max_new_tokens=500), {}, "max_position_embeddings"),
    ([[1, 2]], SamplingParams(stop=("x",)), {}, "detokenize"),
    ([[1, 2], [3]], [SamplingParams()], {}, "1 SamplingParams for 2 prompts"),
    ([[1, 2]], None, {"draft_tokens": 0}, "draft_tokens"),
])
def test_bad_input_is_named(model, prompts, params, kw, msg):
    with pytest.raises(ValueError, match=msg):
        Engine(model).generate(prompts, params, **kw)


def test_wrong_model_type():
    with pytest.raises(TypeError, match="Mellum2"):
        Engine(object())


@pytest.mark.slow
def test_compiled_decode_step_equals_eager(model):
    """torch.compile of the static-cache decode step (on CUDA it is captured as a CUDA graph)."""
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    want = [r.tokens for r in Engine(model).generate(PROMPTS, params)]
    eng = Engine(model, compile=True)
    assert [r.tokens for r in eng.generate(PROMPTS, params)] == want
    assert [r.tokens for r in eng.generate(PROMPTS, params)] == want  # the compiled step is reused


@pytest.mark.slow
def test_compiled_decode_step_bf16_batch1(model):
    """bf16, one row: the compiled step runs with oneDNN off around its call (one-row matmuls); its
    logprobs match the eager step's to bf16 rounding while the tokens agree, and oneDNN is back on."""
    m = copy.deepcopy(model).to(torch.bfloat16)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True)
    want = Engine(m).generate([PROMPTS[1]], params)[0]
    got = Engine(m, compile=True).generate([PROMPTS[1]], params)[0]
    assert torch._C._get_mkldnn_enabled()
    same = 0
    while same < len(want.tokens) and got.tokens[same] == want.tokens[same]:
        same += 1
    assert same >= 4, (got.tokens, want.tokens)
    assert max(abs(a - b) for a, b in zip(got.logprobs[:same], want.logprobs[:same])) < 0.05


def test_cached_engine_does_not_keep_the_model_alive():
    import copy
    import gc
    import weakref

    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    generate(m, PROMPTS[0], 2)
    c = copy.deepcopy(m)  # a copy starts without the cached engine (its tensors are the original's)
    assert generate(c, PROMPTS[0], 2, ignore_eos=True).tokens == generate(m, PROMPTS[0], 2, ignore_eos=True).tokens
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None
