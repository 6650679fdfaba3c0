"""FP8 hybrid (mellum2/train/fp8.py): quantisation, the emulated path against real `torch._scaled_mm`
GEMMs, CUDA's `_scaled_mm` shape rule enforced on the CPU (any token count, any width), every
backend training a model, the module swap, and the loss gap of a short FP8 run against bf16."""
import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.train.fp8 import (E4M3, E5M2, Float8GroupedMM, Float8Linear, check_scaled_mm_shapes, convert_to_fp8,
                               fake_quantize, fp8_linear, quantize)
from test_train_utils import train_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tensorwise_power_of_two_scaling():
    torch.manual_seed(0)
    x = torch.randn(64, 32) * 3.7
    for dt in (E4M3, E5M2):
        x8, s = quantize(x, dt)
        assert x8.dtype == dt and s.numel() == 1
        m = torch.log2(s)
        assert m == torch.round(m)  # power of two
        fmax = torch.finfo(dt).max
        amax_scaled = x.abs().max() * s
        assert fmax / 2 < amax_scaled <= fmax  # uses the range without overflowing
        deq = fake_quantize(x, dt, torch.bfloat16)
        assert torch.equal(deq.float(), x8.float() / s)  # dequantisation is exact in bf16
        rel = ((deq.float() - x).norm() / x.norm()).item()
        assert rel < (0.04 if dt == E4M3 else 0.08)
    _, s_E11 = quantize(torch.stack([x, 100 * x]), E4M3, dims=(1, 2))  # one scale per expert matrix
    assert s_E11.shape == (2, 1, 1) and s_E11[0] > s_E11[1]


def test_emulated_linear_equals_scaled_mm():
    torch.manual_seed(1)
    x = torch.randn(2, 32, 128, requires_grad=True)
    w = torch.randn(96, 128, requires_grad=True)
    g = torch.randn(2, 32, 96)
    res = {}
    for be in ("emulate", "scaled_mm"):
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fp8_linear(x, w, be)
        assert y.dtype == torch.bfloat16
        (y.float() * g).sum().backward()
        res[be] = (y.detach().float(), x.grad.clone(), w.grad.clone())
    assert torch.equal(res["emulate"][0], res["scaled_mm"][0])  # same products, fp32 sums, one rounding
    for i in (1, 2):  # dgrad/wgrad: the emulated GEMM rounds its output to bf16 once more
        a, b = res["emulate"][i], res["scaled_mm"][i]
        assert ((a - b).abs() <= b.abs() * 2 ** -7 + 1e-3).all()
    ref = x.detach() @ w.detach().T
    assert ((res["emulate"][0] - ref).norm() / ref.norm()) < 0.06  # it is the matmul, to FP8 accuracy


def test_emulated_grouped_mm_equals_scaled_mm_loop():
    torch.manual_seed(2)
    x = torch.randn(40, 64).bfloat16()
    w = torch.randn(3, 64, 32).bfloat16() * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1).bfloat16()
    offs = torch.tensor([8, 24, 40], dtype=torch.int32)
    a = Float8GroupedMM("emulate")(x, w, offs=offs)
    b = Float8GroupedMM("scaled_mm")(x, w, offs=offs)
    assert torch.equal(a, b)
    ref = torch.nn.functional.grouped_mm(x, w, offs=offs).float()
    assert ((a.float() - ref).norm() / ref.norm()) < 0.06


def test_emulated_grouped_mm_gradients_are_fp8_gemms():
    """Backward of the emulated grouped matmul = e5m2 output gradient times the e4m3 operands."""
    torch.manual_seed(3)
    x = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2, 32, 16, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor([8, 16], dtype=torch.int32)
    g = torch.randn(16, 16, dtype=torch.bfloat16)
    Float8GroupedMM("emulate")(x, w, offs=offs).backward(g)
    gq = fake_quantize(g, E5M2, torch.bfloat16)
    wq = fake_quantize(w.detach(), E4M3, torch.bfloat16, dims=(1, 2))
    xq = fake_quantize(x.detach(), E4M3, torch.bfloat16)
    ref_gx = torch.cat([gq[:8] @ wq[0].T, gq[8:] @ wq[1].T])
    ref_gw = torch.stack([xq[:8].T @ gq[:8], xq[8:].T @ gq[8:]])
    torch.testing.assert_close(x.grad, ref_gx, rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(w.grad, ref_gw, rtol=2 ** -7, atol=1e-2)


def test_convert_swaps_attention_and_experts_only():
    cfg = ModelConfig.from_preset("test-small")  # 4 layers (1 dense, 3 sparse) + an MoE MTP layer
    torch.manual_seed(0)
    model = Mellum2(cfg)
    keys = list(model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids, labels=ids).loss.item()
    n = convert_to_fp8(model)
    assert n == {"linears": 5 * 4, "experts": 4}
    assert list(model.state_dict()) == keys  # names (= checkpoint keys) unchanged
    assert isinstance(model.model.layers[0].self_attn.q_proj, Float8Linear)
    assert not isinstance(model.lm_head, Float8Linear) and not isinstance(model.mtp.fc, Float8Linear)
    assert type(model.model.layers[0].mlp.gate_proj) is torch.nn.Linear  # dense MLP stays bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.loss.item() != ref and abs(out.loss.item() - ref) < 0.02
    out.loss.backward()
    assert model.model.layers[1].mlp.experts.gate_proj.grad is not None
    assert convert_to_fp8(model) == {"linears": 0, "experts": 0}  # idempotent


def test_fp8_loss_gap_on_a_short_run():
    """FP8 hybrid vs bf16 on the same 24 steps: the curves must stay within 0.03 nats (measured
    ~0.002 at 40 steps), and FP8 must actually change the numbers."""
    bf16 = train_losses("test-small", steps=24, fp8=False)
    fp8 = train_losses("test-small", steps=24, fp8=True)
    assert bf16[-1] < bf16[0] - 1.0  # it learns
    gap = abs(sum(fp8[-5:]) / 5 - sum(bf16[-5:]) / 5)
    assert gap < 0.03, (gap, bf16[-5:], fp8[-5:])
    assert fp8 != bf16


def _strict_scaled_mm(monkeypatch):
    """torch._scaled_mm with CUDA's shape rule enforced (the CPU reference kernel accepts any shape);
    returns the list of (mat1, mat2) shapes it was called with."""
    calls, real = [], torch._scaled_mm

    def strict(a, b, **kw):
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0, (a.shape, b.shape)
        assert a.stride(1) == 1 and b.stride(0) == 1, (a.stride(), b.stride())
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", strict)
    return calls


def test_scaled_mm_shape_rule_is_checked_without_a_gpu():
    a8 = torch.randn(30, 40).to(E4M3)
    with pytest.raises(ValueError, match="multiples of 16"):
        check_scaled_mm_shapes(a8, torch.randn(40, 32).to(E4M3).t().contiguous().t())
    with pytest.raises(ValueError, match="column-major"):
        check_scaled_mm_shapes(torch.randn(30, 48).to(E4M3), torch.randn(48, 32).to(E4M3))
    check_scaled_mm_shapes(torch.randn(30, 48).to(E4M3), torch.randn(32, 48).to(E4M3).t())  # M is free


@pytest.mark.parametrize("tokens", [1, 15, 30, 33])
def test_scaled_mm_linear_any_token_count_equals_emulate(monkeypatch, tokens):
    """Token counts (and widths: 40, 24) that are not multiples of 16 go through zero padding, exact
    against the emulated path; the weight gradient is the call that failed on a GPU (K = tokens)."""
    calls = _strict_scaled_mm(monkeypatch)
    torch.manual_seed(tokens)
    x = torch.randn(tokens, 40, requires_grad=True)
    w = torch.randn(24, 40, requires_grad=True)
    g = torch.randn(tokens, 24)
    res = {}
    for be in ("emulate", "scaled_mm"):
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fp8_linear(x, w, be)
        (y.float() * g).sum().backward()
        res[be] = (y.detach().float(), x.grad.clone(), w.grad.clone())
    assert len(calls) == 3 and any(a[1] == _up16(tokens) for a, _ in calls)  # fwd, dgrad, wgrad
    assert torch.equal(res["emulate"][0], res["scaled_mm"][0])
    for i in (1, 2):
        a, b = res["emulate"][i], res["scaled_mm"][i]
        assert ((a - b).abs() <= b.abs() * 2 ** -7 + 1e-3).all(), i


def _up16(n):
    return (n + 15) // 16 * 16


def test_grouped_scaled_mm_trains_and_equals_emulate(monkeypatch):
    """The experts' scaled_mm backend has a backward (dgrad and wgrad per group, padded groups of 5,
    0, 11 and 9 rows) and it equals the emulated grouped matmul's."""
    calls = _strict_scaled_mm(monkeypatch)
    torch.manual_seed(4)
    x = torch.randn(25, 40, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 40, 24, dtype=torch.bfloat16, requires_grad=True)
    offs = torch.tensor([5, 5, 16, 25], dtype=torch.int32)
    g = torch.randn(25, 24, dtype=torch.bfloat16)
    res = {}
    for be in ("emulate", "scaled_mm"):
        x.grad = w.grad = None
        y = Float8GroupedMM(be)(x, w, offs=offs)
        y.backward(g)
        res[be] = (y.detach().float(), x.grad.float(), w.grad.float())
    assert len(calls) == 3 * 3  # three non-empty groups x (fwd, dgrad, wgrad)
    assert torch.equal(res["emulate"][0], res["scaled_mm"][0])
    for i in (1, 2):
        a, b = res["emulate"][i], res["scaled_mm"][i]
        assert ((a - b).abs() <= b.abs() * 2 ** -7 + 1e-2).all(), i
    assert (res["scaled_mm"][2][1] == 0).all()  # the empty expert gets no gradient


@pytest.mark.parametrize("backend", ["auto", "emulate", "scaled_mm"])
def test_every_backend_trains_a_model(monkeypatch, backend):
    """Forward, backward and optimiser steps of a model whose widths are not multiples of 16
    (test-small2: expert width 24, head_dim 12) with 2 x 13 tokens, for every --fp8-backend."""
    _strict_scaled_mm(monkeypatch)
    from mellum2.train.optim import build_optimizers

    cfg = ModelConfig.from_preset("test-small2")
    torch.manual_seed(0)
    model = Mellum2(cfg)
    convert_to_fp8(model, backend)
    opt = build_optimizers(model, 3e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if backend == "scaled_mm":  # the same first step as emulate, up to summation order
        torch.manual_seed(0)
        model_e = Mellum2(cfg)
        convert_to_fp8(model_e, "emulate")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert abs(model_e(ids, labels=ids).loss.item() - losses[0]) < 1e-2
