"""MTP self-speculative decoding: greedy output identical to plain greedy (random and trained weights,
k = 1..3, ragged batches); sampled output distributed exactly as plain sampling (chi-square against
the exact distribution, with an always-accept negative control that the same test rejects); stats;
a checkpoint without MTP weights falls back with a notice."""
import copy
import math

import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.infer import Engine, SamplingParams, generate
from mellum2.infer.sampling import Sampler


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def markov_batch(n, T, g, V=67):
    """A learnable toy language: each token has one favourite successor (85%), else uniform."""
    nxt = torch.randint(3, V, (V,), generator=torch.Generator().manual_seed(0))
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(3, V, (n,), generator=g)
    for t in range(1, T):
        noise = torch.rand(n, generator=g) < 0.15
        x[:, t] = torch.where(noise, torch.randint(3, V, (n,), generator=g), nxt[x[:, t - 1]])
    return x


@pytest.fixture(scope="module")
def trained():
    """test-small trained jointly (trunk + MTP) for a few seconds on the toy language."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures are set up before the function-scoped one
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small"))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        x = markov_batch(32, 48, g)
        m(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(n)
    return m.eval()


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return Mellum2(ModelConfig.from_preset("test-small")).eval()


PROMPTS = [[5, 9, 11], list(range(20, 37)), [7] * 9, [40, 41]]


@pytest.mark.parametrize("weights", ["random", "trained"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculative_equals_plain_greedy(weights, k, trained, random_model):
    m = trained if weights == "trained" else random_model
    prompts = PROMPTS if weights == "random" else markov_batch(4, 10, torch.Generator().manual_seed(5)).tolist()
    eng = Engine(m, prefill_chunk=5 if k == 2 else 1024)  # chunked prefill, MTP included
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=True)
    plain = eng.generate(prompts, params)
    spec = eng.generate(prompts, params, speculative=True, draft_tokens=k)
    for a, b in zip(plain, spec):
        assert b.tokens == a.tokens
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=1e-4, atol=1e-4)
    s = spec[0].stats
    assert s.speculative and s.draft_tokens == k
    assert s.drafted == k * s.verify_rows and 0 <= s.accepted <= s.drafted
    assert s.new_tokens == 4 * 30
    if weights == "trained":
        assert s.acceptance > 0.6, s.as_dict()
        assert s.mean_accepted_length > 1.5
        assert s.steps < 30  # fewer trunk passes than tokens


@pytest.mark.parametrize("k", [1, 3])
def test_draft_vocabulary_keeps_greedy_output(trained, k):
    eng = Engine(trained)
    prompts = markov_batch(3, 10, torch.Generator().manual_seed(6)).tolist()
    params = SamplingParams(max_new_tokens=25, ignore_eos=True)
    want = [r.tokens for r in eng.generate(prompts, params)]
    full = eng.generate(prompts, params, speculative=True, draft_tokens=k)[0].stats.acceptance
    eng.set_draft_vocab(list(range(67)))  # every token of the toy language: acceptance unchanged
    got = eng.generate(prompts, params, speculative=True, draft_tokens=k)
    assert [r.tokens for r in got] == want and got[0].stats.acceptance == full
    eng.set_draft_vocab(list(range(0, 67, 2)))  # half of them: fewer accepted, same output
    got = eng.generate(prompts, params, speculative=True, draft_tokens=k)
    assert [r.tokens for r in got] == want and got[0].stats.acceptance < full
    with pytest.raises(ValueError, match="set_draft_vocab"):
        eng.set_draft_vocab([5, 9999])


def test_speculative_stops_like_plain(trained):
    eng = Engine(trained)
    prompt = markov_batch(1, 10, torch.Generator().manual_seed(2)).tolist()
    toks = eng.generate(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True))[0].tokens
    stop = toks[11]
    for k in (1, 3):
        for params in [SamplingParams(max_new_tokens=40, stop_token_ids=(stop,), ignore_eos=True),
                       SamplingParams(max_new_tokens=13, ignore_eos=True)]:
            want = eng.generate(prompt, params)[0]
            got = eng.generate(prompt, params, speculative=True, draft_tokens=k)[0]
            assert got.tokens == want.tokens and got.finish_reason == want.finish_reason


def test_rows_ending_inside_an_accepted_block(trained, monkeypatch):
    """A row whose budget ends in the middle of an accepted block stops there and leaves the batch
    while a slower row of the same budget goes on.
    The slow row is made slow by rejecting all its drafts, which greedy decoding tolerates: the
    correction token is then the trunk's argmax at the first position, the same token."""
    import mellum2.infer.speculative as spec_mod
    from mellum2.infer.speculative import gather_rows, verify

    def verify_row1_rejects(sampler, logits, drafts, q):
        out, m, p = verify(sampler, logits, drafts, q)
        if len(m) < 2:  # row 0 has finished and left the batch
            return out, m, p
        m = m.clone()
        m[1] = 0
        a = logits.argmax(-1)
        return torch.where(torch.arange(out.shape[1]) <= m[:, None], a, gather_rows(a, m)[:, None]), m, p

    monkeypatch.setattr(spec_mod, "verify", verify_row1_rejects)
    eng = Engine(trained)
    prompts = markov_batch(2, 10, torch.Generator().manual_seed(4)).tolist()
    for k in (2, 3):
        params = SamplingParams(max_new_tokens=k + 3, ignore_eos=True)  # 1 + (k+1), then k+1 more: overshoot
        want = [r.tokens for r in eng.generate(prompts, params)]
        got = eng.generate(prompts, params, speculative=True, draft_tokens=k)
        assert [r.tokens for r in got] == want
        assert got[0].stats.steps == 2 + 1  # row 0: 1 + (k+1), then k+1 (overshoot); row 1 then alone


def test_no_mtp_head_generates_normally_with_a_notice(random_model):
    m = Mellum2(ModelConfig.from_preset("test-small", num_nextn_predict_layers=0)).eval()
    with pytest.warns(UserWarning, match="no MTP head"):
        r = generate(m, PROMPTS[0], 10, speculative=True, ignore_eos=True)
    assert r.tokens == generate(m, PROMPTS[0], 10, ignore_eos=True).tokens
    assert not r.stats.speculative and "speculative decoding is off" in r.stats.notice and r.stats.drafted == 0


# ---------------------------------------------------------------------------- distribution
def exact_joint(m, prompt, n, params: SamplingParams):
    """P(t1..tn) of plain sampling by enumeration over the top-k candidates at every step."""
    seqs, probs = [list(prompt)], [1.0]
    for _ in range(n):
        with torch.no_grad():
            logits = m(torch.tensor(seqs)).logits[:, -1:]
        p = Sampler([params] * len(seqs), m.cfg.vocab_size, "cpu", seqs).probs(logits)[:, 0]
        new_s, new_p = [], []
        for s, pr, row in zip(seqs, probs, p):
            for t in row.nonzero()[:, 0].tolist():
                new_s.append(s + [t])
                new_p.append(pr * float(row[t]))
        seqs, probs = new_s, new_p
    return {tuple(s[len(prompt):]): p for s, p in zip(seqs, probs)}


def chi2_stat(samples, exact):
    n = len(samples)
    counts = {}
    for s in samples:
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    assert set(counts) <= set(exact), "a sequence plain sampling can never produce"
    stat, df, rest_o, rest_e = 0.0, -1, 0, 0.0
    for key, p in exact.items():  # pool rare outcomes so every cell expects >= 5
        if n * p >= 5:
            stat += (counts.get(key, 0) - n * p) ** 2 / (n * p)
            df += 1
        else:
            rest_o, rest_e = rest_o + counts.get(key, 0), rest_e + n * p
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
        df += 1
    z = 3.72  # one-sided p = 1e-4; Wilson-Hilferty quantile of chi-square(df)
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


def test_rejection_sampling_matches_plain_distribution(trained, monkeypatch):
    # a hot temperature over the top 3 and a head that is half wrong (noise on its input projection):
    # drafts are both accepted and rejected, and q is far enough from p for the control below to show
    m = copy.deepcopy(trained)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        m.mtp.fc.weight.add_(torch.randn(m.mtp.fc.weight.shape, generator=g) * m.mtp.fc.weight.std() * 1.5)
    params = SamplingParams(max_new_tokens=3, temperature=2.5, top_k=3, ignore_eos=True)
    prompt, n = markov_batch(1, 6, torch.Generator().manual_seed(3))[0].tolist(), 3000
    exact = exact_joint(m, prompt, 3, params)
    eng = Engine(m)
    spec = eng.generate([prompt] * n, params, speculative=True, draft_tokens=2)
    s = spec[0].stats
    assert 0.2 < s.acceptance < 0.95, s.as_dict()
    stat, crit = chi2_stat([r.tokens for r in spec], exact)
    assert stat < crit, (stat, crit)
    plain = eng.generate([prompt] * n, params)
    stat_p, _ = chi2_stat([r.tokens for r in plain], exact)
    assert stat_p < crit, (stat_p, crit)
    # a draft vocabulary that lacks some likely tokens: q = 0 there, still exactly p
    trimmed = Engine(m, draft_vocab=list(range(0, 50)))
    spec_v = trimmed.generate([prompt] * n, params, speculative=True, draft_tokens=2)
    stat_v, _ = chi2_stat([r.tokens for r in spec_v], exact)
    assert stat_v < crit, (stat_v, crit)
    assert spec_v[0].stats.acceptance < s.acceptance
    # negative control: accepting every draft (u = 0) is not lossless, and the test sees it
    monkeypatch.setattr(Sampler, "uniform", lambda self, shape: torch.zeros(shape))
    bad = eng.generate([prompt] * n, params, speculative=True, draft_tokens=2)
    try:
        stat_b, _ = chi2_stat([r.tokens for r in bad], exact)
    except AssertionError:  # produced a sequence plain sampling never would
        stat_b = math.inf
    assert stat_b > crit, (stat_b, crit)


def test_rejection_sampling_with_a_repetition_penalty(trained):
    """Penalties make p and q depend on the drafts earlier in the block; still exactly plain sampling.
    The prompt ends in token 4, whose favourite successor 6 is its own favourite successor: the block
    repeats 6, so the penalty of a drafted 6 reshapes the target at the next position (verifying
    without that context produces sequences plain sampling never would)."""
    params = SamplingParams(max_new_tokens=3, temperature=2.0, top_k=3, repetition_penalty=3.0, ignore_eos=True)
    prompt = [10, 11, 12, 4]
    exact = exact_joint(trained, prompt, 3, params)  # prompt = everything so far: the repetition memory
    spec = Engine(trained).generate([prompt] * 3000, params, speculative=True, draft_tokens=2)
    assert spec[0].stats.acceptance > 0.3
    stat, crit = chi2_stat([r.tokens for r in spec], exact)
    assert stat < crit, (stat, crit)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_compiled_greedy_speculation_equals_plain_greedy(trained, k):
    """Engine(compile=True): greedy speculation runs as one compiled graph per step (verify, accept,
    MTP over all k+1 positions, next drafts); output identical to plain greedy, ragged batch and a
    single row, with the window-8 rings wrapping many times."""
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)
    eng = Engine(trained, compile=True)
    for prompts in (PROMPTS, PROMPTS[1:2]):
        want = [r.tokens for r in Engine(trained).generate(prompts, params)]
        res = eng.generate(prompts, params, speculative=True, draft_tokens=k)
        assert [r.tokens for r in res] == want
        assert res[0].stats.drafted > 0 and res[0].stats.accepted > 0
    assert any(key[:2] == ("spec", k) for key in eng.compiled.graphs)


def test_context_buckets():
    from mellum2.infer.steps import bucket as _bucket

    assert [_bucket(h, 4096) for h in (1, 128, 129, 256, 257, 3000, 5000)] == [128, 128, 256, 256, 512, 4096, 4096]
    assert _bucket(100, 64) == 64


def test_compile_engine_sampled_speculation_runs_eagerly_on_its_static_cache(trained):
    """Engine(compile=True) compiles greedy speculation only; sampled speculation runs the eager step
    on the engine's static cache (full context, k drafts' ring) and equals an engine without it."""
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=3, ignore_eos=True)
    want = [r.tokens for r in Engine(trained).generate(PROMPTS, params, speculative=True, draft_tokens=2)]
    eng = Engine(trained, compile=True)
    got = [r.tokens for r in eng.generate(PROMPTS, params, speculative=True, draft_tokens=2)]
    assert got == want
    assert eng.pool is not None and eng.pool.capacity >= trained.cfg.max_position_embeddings
    assert not eng.compiled.graphs  # nothing was compiled
