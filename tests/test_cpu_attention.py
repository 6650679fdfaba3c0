"""kernels/cpu_attention.py: SDPA's forward, our blocked backward; values and gradients vs SDPA; and
`kernels.install`, the one place that gives it to a model."""
import pytest
import torch
import torch.nn.functional as F

from mellum2 import kernels
from mellum2.kernels import cpu_attention
from mellum2.kernels.cpu_attention import applies, attention
from mellum2.model.layers import attn_mask, doc_ids_from_positions


def _grads(fn, q, k, v, go):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(go)
    return o.detach(), q.grad, k.grad, v.grad


def _masks(T):
    pos = torch.cat([torch.arange(5), torch.arange(T - 5)])[None].expand(2, T)  # two documents per row
    return {
        "causal": None,
        "window": attn_mask(T, 4, None, "cpu"),
        "documents": attn_mask(T, None, doc_ids_from_positions(pos), "cpu"),
        "documents+window": attn_mask(T, 6, doc_ids_from_positions(pos), "cpu"),
    }


WINDOW = {"causal": None, "window": 4, "documents": None, "documents+window": 6}


@pytest.mark.parametrize("kind", ["causal", "window", "documents", "documents+window"])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (6, 1)])
@pytest.mark.parametrize("block_rows", [7, 1024])
@pytest.mark.parametrize("promise", [True, False])
def test_matches_sdpa_fp32(kind, heads, block_rows, promise):
    """promise: tell it the mask is causal (and its window), so the backward skips key ranges."""
    torch.manual_seed(0)
    (H, G), B, T, d = heads, 2, 19, 16
    q, go = torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    k, v = torch.randn(B, G, T, d), torch.randn(B, G, T, d)
    m = _masks(T)[kind]
    ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=m is None,
                                                                 enable_gqa=H != G), q, k, v, go)
    kw = dict(is_causal=True, window=WINDOW[kind]) if promise else dict(is_causal=m is None)
    ours = _grads(lambda q, k, v: attention(q, k, v, m, block_rows=block_rows, **kw), q, k, v, go)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda s: f"{name}: {s}")


def test_bf16_error_like_sdpa():
    """In bf16 our gradients are as close to the fp32 ones as SDPA's own bf16 gradients are."""
    torch.manual_seed(0)
    B, H, G, T, d = 2, 4, 2, 64, 32
    q, k, v, go = (torch.randn(B, h, T, d) for h in (H, G, G, H))
    m = _masks(T)["window"]
    exact = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True), q, k, v, go)
    bf = [x.bfloat16() for x in (q, k, v, go)]
    sd = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True), *bf)
    ours = _grads(lambda q, k, v: attention(q, k, v, m, is_causal=True, window=4), *bf)
    for name, e, s, o in zip(("out", "dq", "dk", "dv"), exact, sd, ours):
        err = lambda x: ((x.float() - e).norm() / e.norm()).item()  # noqa: E731
        assert err(o) < 2 * err(s) + 2e-3, (name, err(o), err(s))
        assert o.dtype == torch.bfloat16


def test_a_broken_promise_shows():
    """The skipping is real: a window smaller than the mask's changes the gradients (so the tests
    above would catch a wrong key range)."""
    torch.manual_seed(0)
    B, H, G, T, d = 1, 2, 1, 24, 8
    q, k, v, go = (torch.randn(B, h, T, d) for h in (H, G, G, H))
    m = _masks(T)["window"]  # window 4
    good = _grads(lambda q, k, v: attention(q, k, v, m, is_causal=True, window=4, block_rows=8), q, k, v, go)
    bad = _grads(lambda q, k, v: attention(q, k, v, m, is_causal=True, window=1, block_rows=8), q, k, v, go)
    assert not torch.allclose(good[1], bad[1])
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, m, window=0)


def test_applies_only_to_cpu_training():
    x = torch.randn(1, 1, 2, 2)
    assert not applies(x, torch.bfloat16)
    assert applies(x.requires_grad_(), torch.bfloat16)
    assert not applies(x, torch.float32)  # SDPA's fp32 backward is faster
    with torch.no_grad():
        assert not applies(x, torch.bfloat16)


def test_a_model_as_built_runs_sdpa_and_install_selects_the_kernel(monkeypatch):
    from mellum2 import Mellum2, ModelConfig
    from mellum2.model.layers import Attention

    m = Mellum2(ModelConfig.from_preset("test-small"))
    attn = [x for x in m.modules() if isinstance(x, Attention)]
    assert attn and all(x.kernel is None and not x.fuse_qkv for x in attn)
    done = kernels.install(m, experts=False)
    assert done["cpu_attention"] and done["fuse_qkv"]
    assert all(x.kernel is cpu_attention.training_attention and x.fuse_qkv for x in attn)
    monkeypatch.setenv("MELLUM2_CPU_ATTENTION", "sdpa")  # the opt-out, read at install
    assert not kernels.install(m, experts=False)["cpu_attention"] and all(x.kernel is None for x in attn)
    with pytest.raises(ValueError, match="attention must be one of"):
        kernels.install(m, attention="flash", experts=False)


def test_model_training_uses_it_and_matches_sdpa(monkeypatch):
    """A training forward + backward of the model with and without it: same loss and gradients."""
    from mellum2 import Mellum2, ModelConfig

    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small")).train()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 24))
    calls = []
    orig = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    monkeypatch.setattr(cpu_attention, "applies", lambda q, dt: q.requires_grad)  # fp32 too: exact comparison
    kernels.install(m, experts=False, fuse_qkv=False)
    out = m(ids, labels=ids)
    out.loss.backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert calls, "training forward did not use cpu_attention"
    m.zero_grad()
    kernels.install(m, attention="sdpa", experts=False, fuse_qkv=False)
    ref = m(ids, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")


def test_bf16_autocast_training_uses_it():
    from mellum2 import Mellum2, ModelConfig

    m = Mellum2(ModelConfig.from_preset("test-small")).train()
    kernels.install(m, experts=False)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 24))
    seen = []
    orig = cpu_attention._Attention.forward
    cpu_attention._Attention.forward = staticmethod(lambda ctx, q, *a: seen.append(q.dtype) or orig(ctx, q, *a))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(ids, labels=ids).loss
        loss.backward()
    finally:
        cpu_attention._Attention.forward = orig
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.model.layers[0].self_attn.parameters())


def test_compiled_backward_matches(monkeypatch):
    """Above `_COMPILE_FROM` score entries the backward runs compiled: same gradients as SDPA."""
    monkeypatch.setattr(cpu_attention, "_COMPILE_FROM", 0)
    compiled = cpu_attention.CompiledOrEager(cpu_attention._backward, "test")
    called = []
    monkeypatch.setattr(cpu_attention, "_compiled_backward", lambda *a: called.append(1) or compiled(*a))
    torch.manual_seed(0)
    B, H, G, T, d = 2, 4, 2, 16, 8
    q, go = torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    k, v = torch.randn(B, G, T, d), torch.randn(B, G, T, d)
    m = _masks(T)["documents+window"]
    ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True), q, k, v, go)
    ours = _grads(lambda q, k, v: attention(q, k, v, m, is_causal=True, window=6, block_rows=12), q, k, v, go)
    assert called and compiled.compiled not in (None, False), "the compiled backward did not run"
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda s: f"{name}: {s}")
