"""The chunked LM head + cross-entropy (model/head_loss.py) against the logits path, and the
compile-or-eager wrapper it and the CPU attention backward share (kernels/compiled.py)."""
import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.model import head_loss
from mellum2.kernels.compiled import CompiledOrEager
from mellum2.model.head_loss import ce_chunk, linear_ce
from mellum2.model.transformer import shifted_ce


def _grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    loss, n = fn(*leaves)
    loss.backward()
    return (loss.detach(), n, *[t.grad for t in leaves])


@pytest.mark.parametrize("shift", [1, 2])
@pytest.mark.parametrize("chunk_elements", [7 * 50, 1 << 20])  # ragged chunks of 7 rows; one chunk
def test_linear_ce_equals_logits_path_fp32(shift, chunk_elements):
    torch.manual_seed(shift)
    B, T, D, V = 3, 11, 16, 50
    x, w = torch.randn(B, T, D), torch.randn(V, D) * 0.5
    labels = torch.randint(0, V, (B, T))
    labels[0, :5] = -100
    labels[2, -1] = -100
    ref = _grads(lambda x, w: shifted_ce(x @ w.T, labels, shift), x, w)
    ours = _grads(lambda x, w: linear_ce(x, w, labels, shift, chunk_elements=chunk_elements), x, w)
    assert ours[1] == ref[1] == (labels[:, shift:] != -100).sum()
    for name, a, b in zip(("loss", "dx", "dw"), (ours[0], ours[2], ours[3]), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda s: f"{name}: {s}")


def test_linear_ce_scales_with_incoming_gradient():
    torch.manual_seed(0)
    x, w = torch.randn(2, 6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (2, 6))
    loss, _ = linear_ce(x, w, labels, 1, chunk_elements=60)
    (3.0 * loss).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    shifted_ce(x @ w.T, labels, 1)[0].mul(3.0).backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_all_labels_ignored_gives_zero_loss_and_gradients():
    x, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    loss, n = linear_ce(x, w, torch.full((2, 5), -100), 1)
    loss.backward()
    assert loss.item() == 0.0 and n.item() == 0
    assert not x.grad.any() and not w.grad.any()


def test_frozen_head_gets_no_gradient_and_input_gradient_is_right():
    """train-mtp freezes the LM head: its gradient (a [V, D] matmul per chunk) is not computed."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (2, 9))
    xr = x.clone().requires_grad_(True)
    linear_ce(xr, w, labels, 2, chunk_elements=90)[0].backward()
    assert not w.requires_grad and w.grad is None
    xs = x.clone().requires_grad_(True)
    shifted_ce(xs @ w.T, labels, 2)[0].backward()
    torch.testing.assert_close(xr.grad, xs.grad, rtol=1e-5, atol=1e-6)


def test_compiled_chunk_equals_eager():
    torch.manual_seed(0)
    logits, tgt = torch.randn(64, 96).bfloat16(), torch.randint(0, 96, (64,))
    tgt[::7] = -100
    compiled = CompiledOrEager(ce_chunk, "test")
    a, b = compiled(logits, tgt), ce_chunk(logits, tgt)
    assert compiled.compiled not in (None, False), "did not run compiled"
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a[1].float(), b[1].float(), rtol=0, atol=1e-2)
    assert a[1].dtype == torch.bfloat16 and not a[1][::7].any()


def test_large_chunks_run_compiled(monkeypatch):
    """linear_ce takes the compiled chunk from _COMPILE_FROM logits per chunk, the eager one below."""
    used = []
    monkeypatch.setattr(head_loss, "_compiled_chunk", lambda *a: used.append("compiled") or ce_chunk(*a))
    monkeypatch.setattr(head_loss, "ce_chunk", lambda *a: used.append("eager") or ce_chunk(*a))
    x, w, labels = torch.randn(1, 9, 4), torch.randn(10, 4), torch.randint(0, 10, (1, 9))
    monkeypatch.setattr(head_loss, "_COMPILE_FROM", 40)
    linear_ce(x, w, labels, 1, chunk_elements=40)  # 4 rows x 10 = 40 logits per chunk
    linear_ce(x, w, labels, 1, chunk_elements=30)  # 3 rows x 10 = 30
    assert used == ["compiled"] * 2 + ["eager"] * 3


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    f = CompiledOrEager(lambda a: a * 2, "the doubling")
    with pytest.warns(UserWarning, match="compiling the doubling failed.*no C\\+\\+ compiler"):
        assert f(torch.tensor(3.0)).item() == 6.0
    assert f.compiled is False
    assert f(torch.tensor(4.0)).item() == 8.0  # eager from then on, no second warning


def test_in_place_functions_are_not_rerun_after_a_run_time_error(monkeypatch):
    """CompiledOrEager(in_place=True) (Muon's update, clipping): a failed compile falls back to eager;
    an error raised while the compiled code ran is raised, since the inputs may already be edited."""
    def double_(a):
        a.mul_(2)

    def compile_then(error):
        def fake_compile(fn, **kw):
            def run(a):
                a.mul_(2)  # the compiled code got as far as editing its input
                raise error
            return run
        monkeypatch.setattr(torch, "compile", fake_compile)

    compile_then(RuntimeError("a kernel failed"))
    a = torch.ones(3)
    with pytest.raises(RuntimeError, match="a kernel failed"):
        CompiledOrEager(double_, "doubling", in_place=True)(a)
    assert a.tolist() == [2.0, 2.0, 2.0]  # applied once, not again eagerly
    # a compile failure (dynamo / inductor raise TorchDynamoException subclasses) still falls back
    compile_then(torch._dynamo.exc.InternalTorchDynamoError("no C++ compiler"))
    f, b = CompiledOrEager(lambda x: x.mul_(2), "doubling", in_place=True), torch.ones(3)
    with pytest.warns(UserWarning, match="compiling doubling failed"):
        f(b)
    assert f.compiled is False and b.tolist() == [4.0, 4.0, 4.0]  # the fake's edit, then eager's


@pytest.fixture(scope="module")
def mtp_model():
    torch.manual_seed(0)
    return Mellum2(ModelConfig.from_preset("test-small", num_nextn_predict_layers=1)).train()


def _model_grads(model, ids, labels, prec, return_logits):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
        out = model(ids, labels=labels, return_logits=return_logits)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_without_logits_same_losses_and_gradients(mtp_model):
    torch.manual_seed(1)
    ids = torch.randint(0, mtp_model.cfg.vocab_size, (2, 24))
    labels = ids.clone()
    labels[1, :6] = -100
    a, ga = _model_grads(mtp_model, ids, labels, "fp32", True)
    b, gb = _model_grads(mtp_model, ids, labels, "fp32", False)
    assert b.logits is None and b.mtp_logits is None and a.logits is not None
    assert set(a.losses) == set(b.losses) == {"ce", "mtp", "lb", "z"} and a.n_tokens == b.n_tokens
    for k in a.losses:
        torch.testing.assert_close(b.losses[k], a.losses[k], rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=lambda s: f"{n}: {s}")


def test_model_without_logits_bf16_as_accurate_as_logits_path(mtp_model):
    """Under bf16 autocast both paths round the logits and their gradient to bf16: their gradients are
    equally far from the fp32 ones (all together within 10%; per parameter, whose errors are noisier,
    within 50% + 0.005)."""
    torch.manual_seed(2)
    ids = torch.randint(0, mtp_model.cfg.vocab_size, (2, 32))
    _, ref = _model_grads(mtp_model, ids, ids, "fp32", True)
    _, g_logits = _model_grads(mtp_model, ids, ids, "bf16", True)
    _, g_fused = _model_grads(mtp_model, ids, ids, "bf16", False)
    def err(g, names):
        return (torch.cat([(g[n] - ref[n]).flatten() for n in names]).norm()
                / torch.cat([ref[n].flatten() for n in names]).norm()).item()

    assert err(g_fused, ref) <= 1.1 * err(g_logits, ref)
    for n in ref:
        assert err(g_fused, [n]) <= 1.5 * err(g_logits, [n]) + 0.005, (n, err(g_fused, [n]), err(g_logits, [n]))


def test_return_logits_false_needs_labels(mtp_model):
    with pytest.raises(ValueError, match="needs labels"):
        mtp_model(torch.zeros(1, 4, dtype=torch.long), return_logits=False)
