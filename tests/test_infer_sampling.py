"""Sampling transforms against a plain one-row-at-a-time reference; drawing; seeds; validation."""
import math

import pytest
import torch

from mellum2.infer.sampling import Sampler, SamplingParams


def ref_probs(logits_V, p: SamplingParams, seen: set, out: set):
    """The obvious implementation, one row: penalties, temperature, top-k, top-p, min-p."""
    x = logits_V.double().clone()
    for t in seen:
        if p.repetition_penalty != 1:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in out:
        x[t] -= p.presence_penalty
    if p.temperature == 0:
        return torch.nn.functional.one_hot(x.argmax(), len(x)).double()
    x = x / p.temperature
    if p.top_k:
        kth = x.sort(descending=True).values[p.top_k - 1]
        x[x < kth] = -math.inf
    probs = x.softmax(-1)
    if p.top_p is not None:
        order = probs.argsort(descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool)
        mass = 0.0
        for i in order.tolist():
            if mass >= p.top_p:
                break
            keep[i] = True
            mass += probs[i].item()
        probs = torch.where(keep, probs, 0.0)
        probs /= probs.sum()
    if p.min_p:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=12, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.7),
    SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=1.5),
]


@pytest.mark.parametrize("mix", ["all", "topk-only", "greedy-only"])
def test_probs_match_reference(mix):
    params = {"all": PARAMS, "topk-only": [p for p in PARAMS if p.top_k or p.greedy],
              "greedy-only": [p for p in PARAMS if p.greedy]}[mix]
    V, N = 50, 3
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (6,), generator=g).tolist() for _ in params]
    s = Sampler(params, V, "cpu", prompts)
    outs = torch.randint(0, V, (len(params), 4), generator=g)
    s.observe(outs)
    extra = torch.randint(0, V, (len(params), N - 1), generator=g)  # drafts earlier in the block
    logits = torch.randn(len(params), N, V, generator=g) * 3
    got = s.probs(logits, extra)
    for b, p in enumerate(params):
        for j in range(N):
            before = set(extra[b, :j].tolist())
            want = ref_probs(logits[b, j], p, set(prompts[b]) | set(outs[b].tolist()) | before,
                             set(outs[b].tolist()) | before)
            torch.testing.assert_close(got[b, j].double(), want, rtol=1e-5, atol=1e-6)


def test_draw_follows_probs():
    V = 6
    p = torch.tensor([0.5, 0.25, 0.125, 0.0, 0.0625, 0.0625])
    s = Sampler([SamplingParams(temperature=1.0, seed=3)], V, "cpu")
    n = 20000
    counts = torch.zeros(V)
    for _ in range(n // 1000):
        toks = s.draw(p.expand(1, 1000, V).contiguous())
        counts += torch.bincount(toks.reshape(-1), minlength=V)
    assert counts[3] == 0
    chi2 = (((counts - n * p) ** 2) / (n * p).clamp(min=1e-9))[p > 0].sum()
    assert chi2 < 20.5  # chi-square, 4 dof, p = 0.0004


def test_seed_reproducible_whatever_the_batch():
    V = 100
    logits = torch.randn(1, 1, V)
    a = Sampler([SamplingParams(temperature=1.0, seed=7)], V, "cpu")
    b = Sampler([SamplingParams(temperature=1.0, seed=99), SamplingParams(temperature=1.0, seed=7)], V, "cpu")
    ta = [a.sample(logits).item() for _ in range(20)]
    tb = [b.sample(logits.expand(2, 1, V))[1].item() for _ in range(20)]
    assert ta == tb
    c = Sampler([SamplingParams(temperature=1.0, seed=8)], V, "cpu")
    assert [c.sample(logits).item() for _ in range(20)] != ta


def test_greedy_fast_path_is_argmax():
    s = Sampler([SamplingParams()] * 3, 40, "cpu")
    logits = torch.randn(3, 1, 40)
    assert torch.equal(s.sample(logits), logits.argmax(-1))


def test_logprobs_are_raw_model_logprobs():
    s = Sampler([SamplingParams(temperature=0.5, top_k=3, logprobs=True, top_logprobs=2)], 30, "cpu")
    logits = torch.randn(1, 1, 30)
    tok = torch.tensor([[4]])
    chosen, top = s.logprobs(logits, tok)
    lp = logits.log_softmax(-1)
    assert chosen.item() == pytest.approx(lp[0, 0, 4].item())
    assert top.indices[0, 0].tolist() == lp[0, 0].topk(2).indices.tolist()


@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=2), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(stop=("",)), "stop"), (dict(top_logprobs=-2), "top_logprobs"),
])
def test_invalid_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kw)
