"""The decode fast path (forward.Fast) against the model's own code driven through the same cache
(forward.Reference), for the trunk, the LM head and the MTP head, every MoE implementation."""
import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.infer.forward import MOE_IMPLS, Fast, Reference
from mellum2.infer.kvcache import KVCache


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _run(fwd, m, ids, P, step, steps):
    """Prefill P tokens then `steps` steps of `step` tokens; logits of trunk and MTP at each step."""
    B = ids.shape[0]
    cache = KVCache(m.cfg, B, ids.shape[1] + 2, dtype=m.lm_head.weight.dtype, step_tokens=step, mtp=True)
    outs = []
    with torch.no_grad():
        t, T = 0, P
        for _ in range(steps + 1):
            pos = torch.arange(t, t + T).expand(B, T)
            h = fwd.trunk(ids[:, t:t + T], pos, cache)
            y = fwd.mtp(h, ids[:, t + 1:t + T + 1], pos, cache)
            # the MTP layer with its MLP at one picked position per row (the drafting one)
            pick = (torch.arange(B) + t) % T
            y1 = fwd.mtp(h, ids[:, t + 1:t + T + 1], pos, cache, pick_B=pick)
            assert y1.shape == (B, 1, y.shape[-1])
            tol = dict(rtol=1e-5, atol=2e-5) if y.dtype == torch.float32 else {}  # bf16: its default tolerance
            torch.testing.assert_close(y1[:, 0], y[torch.arange(B), pick], **tol)
            outs += [fwd.head(h), fwd.mtp_head(y), fwd.mtp_head(y1)]
            t, T = t + T, step
    return outs


@pytest.mark.parametrize("preset", ["test-small", "test-small2"])
@pytest.mark.parametrize("moe", [i for i in MOE_IMPLS])
@pytest.mark.parametrize("step", [1, 2])
def test_fast_matches_reference(preset, moe, step):
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset(preset)).eval()
    ids = torch.randint(3, m.cfg.vocab_size, (3, 11 + 12 * step + 2))
    ref = _run(Reference(m), m, ids, 11, step, 12)
    fast = _run(Fast(m, moe), m, ids, 11, step, 12)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rows,step", [(2, 1), (1, 1), (1, 3)])
def test_fast_matches_reference_bf16(rows, step):
    """bf16: batch 1 with one token a step runs every matmul with oneDNN off, 3 tokens a step only the
    per-expert ones (forward._one_row_gemms); the process-wide switch is back on afterwards."""
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small")).eval().to(torch.bfloat16)
    ids = torch.randint(3, m.cfg.vocab_size, (rows, 9 + 12 * step + 2))
    ref = _run(Reference(m), m, ids, 9, step, 12)
    assert torch._C._get_mkldnn_enabled()
    fast = _run(Fast(m), m, ids, 9, step, 12)
    assert torch._C._get_mkldnn_enabled()
    for a, b in zip(ref, fast):  # bf16 rounding happens at slightly different places
        assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_one_row_gemms_restores_onednn_on_error():
    from mellum2.infer.forward import _one_row_gemms

    with pytest.raises(RuntimeError, match="boom"):
        with _one_row_gemms(True):
            assert not torch._C._get_mkldnn_enabled()
            raise RuntimeError("boom")
    assert torch._C._get_mkldnn_enabled()


def test_refresh_sees_new_weights():
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    fast = Fast(m)
    ids = torch.randint(3, 256, (1, 8))
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
    fast.refresh()
    a = _run(Reference(m), m, ids, 6, 1, 0)
    b = _run(fast, m, ids, 6, 1, 0)
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=2e-5)


def test_bad_moe_impl():
    m = Mellum2(ModelConfig.from_preset("test-small"))
    with pytest.raises(ValueError, match="moe must be one of"):
        Fast(m, "nope")


def test_traced_gather_form_equals_matmul_form():
    """The form of moe_gather that torch.compile traces (products reduced over D, then over K and I)
    computes the same experts as the index_select + bmm form used eagerly."""
    from mellum2.infer.forward import _Layer, _moe_gather_traced, moe_gather

    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    L = _Layer(m.model.layers[1], m.cfg)  # a sparse layer
    assert L.moe
    h = torch.randn(3, m.cfg.hidden_size)
    ids = torch.tensor([[0, 3], [2, 1], [3, 0]])
    w = torch.rand(3, 2)
    with torch.no_grad():
        torch.testing.assert_close(_moe_gather_traced(L, h, ids, w), moe_gather(L, h, ids, w), rtol=1e-5, atol=1e-6)


def test_moe_bmm_equals_the_chosen_experts_and_declines_skewed_routing():
    """moe_bmm (every expert's tokens padded into one [E, m, D] block) gives each token the weighted
    sum of its own experts (moe_host, one token at a time), whatever the counts per expert; when one
    expert takes nearly every token the padding would more than double the rows and it declines."""
    from mellum2.infer.forward import moe_bmm, moe_host

    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small").replace(num_experts=16)).eval()
    L = next(L for L in Fast(m).layers if L.moe)
    E, _, D = L.gate.shape
    N, K = 24, 2  # one expert on every token: 16 x 24 padded rows against 48 pairs
    h, res = torch.randn(N, D), torch.randn(N, D)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    w = torch.rand(N, K).softmax(-1)
    with torch.no_grad():
        torch.testing.assert_close(moe_bmm(L, h, ids, w, res), moe_host(L, h, ids, w, res), rtol=1e-5, atol=1e-5)
        skew = torch.stack([torch.tensor([0, 1 + n % (E - 1)]) for n in range(N)])  # expert 0 on every token
        assert moe_bmm(L, h, skew, w, res) is None
        lop = torch.stack([torch.tensor([0, 1]) if n < 9 else torch.randperm(E)[:K] for n in range(N)])
        out = moe_bmm(L, h, lop, w, res)
        if out is not None:  # uneven counts, padded rows: still exactly the chosen experts
            torch.testing.assert_close(out, moe_host(L, h, lop, w, res), rtol=1e-5, atol=1e-5)
