"""The CPU experts matmul (kernels/cpu_experts.py, parallel over experts) against torch's grouped_mm:
the same per-group `mm` calls, so forward and both gradients are equal bit for bit, also compiled;
the trainer installs it (train/parallel.py) and keeps grouped_mm where it cannot be built."""
import pytest
import torch
import torch.nn.functional as F

from mellum2 import Mellum2, ModelConfig
from mellum2 import kernels
from mellum2.kernels import cpu_experts
from mellum2.model.moe import Experts
from mellum2.train.parallel import Dist, parallelize

pytestmark = pytest.mark.skipif(not cpu_experts.load(), reason="no C++ compiler for the extension")


def _case(dtype, sizes=(48, 0, 80, 16, 128, 32), tail=16, K=24, N=40):
    """Groups of uneven size (one empty, as routing gives), rows after the last group (padding)."""
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    R = int(offs[-1]) + tail
    x = torch.randn(R, K, dtype=dtype, requires_grad=True)
    w = torch.randn(len(sizes), K, N, dtype=dtype, requires_grad=True)
    return x, w, offs, int(offs[-1])


def _fwd_bwd(fn, x, w, offs, n):
    y = fn(x, w, offs)
    g = torch.linspace(-1, 1, y[:n].numel(), dtype=y.dtype).view_as(y[:n])
    dx, dw = torch.autograd.grad(y[:n], (x, w), g)
    return y, dx, dw


@pytest.mark.parametrize("threads", [1, 2])
def test_equals_grouped_mm_bit_for_bit(threads):
    n_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, offs, n = _case(torch.bfloat16)
        y0, dx0, dw0 = _fwd_bwd(lambda x, w, o: F.grouped_mm(x, w, offs=o), x, w, offs, n)
        y1, dx1, dw1 = _fwd_bwd(cpu_experts.grouped_mm, x, w, offs, n)
    finally:
        torch.set_num_threads(n_threads)
    assert torch.equal(y1[:n], y0[:n]) and torch.equal(dx1[:n], dx0[:n]) and torch.equal(dw1, dw0)
    assert (y1[n:] == 0).all()  # rows after the last group: zero, not left unwritten
    assert (dw1[1] == 0).all()  # the empty expert's weight gradient
    assert dw1.abs().sum() > 0 and dx1.abs().sum() > 0


def test_fp32_matches_grouped_mm():
    x, w, offs, n = _case(torch.float32)
    y0, dx0, dw0 = _fwd_bwd(lambda x, w, o: F.grouped_mm(x, w, offs=o), x, w, offs, n)
    y1, dx1, dw1 = _fwd_bwd(cpu_experts.grouped_mm, x, w, offs, n)
    for a, b in ((y1[:n], y0[:n]), (dx1[:n], dx0[:n]), (dw1, dw0)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiles_into_one_graph_with_the_same_result():
    x, w, offs, n = _case(torch.bfloat16)

    def f(x, w, offs):
        return F.silu(cpu_experts.grouped_mm(x, w, offs)) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    eager = _fwd_bwd(f, x, w, offs, n)
    got = _fwd_bwd(compiled, x, w, offs, n)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_bad_offsets_are_a_clear_error():
    x, w, offs, n = _case(torch.bfloat16)
    with pytest.raises(RuntimeError, match="offs must be non-decreasing"):
        cpu_experts.grouped_mm(x, w, torch.flip(offs, [0]).contiguous())


def _model():
    return Mellum2(ModelConfig.from_preset("test-small2"))


def test_trainer_installs_it_and_training_matches_grouped_mm():
    torch.manual_seed(0)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    kernels.install(a, experts=False)  # the same fast paths but for the experts' matmul
    assert parallelize(b, Dist(), precision="bf16")["cpu_experts"] is True
    assert all(m.gmm is cpu_experts.grouped_mm for m in b.modules() if isinstance(m, Experts))
    ids = torch.randint(0, a.cfg.vocab_size, (2, 24))
    for m in (a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(ids, labels=ids, return_logits=False).loss.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_build_failure_keeps_grouped_mm(monkeypatch):
    monkeypatch.setattr(cpu_experts, "_ext", False)  # as after a failed build
    m = _model()
    assert parallelize(m, Dist(), precision="bf16")["cpu_experts"] is False
    assert all(e.gmm is F.grouped_mm for e in m.modules() if isinstance(e, Experts))


def test_fp8_experts_are_left_alone():
    from mellum2.train.fp8 import Float8GroupedMM

    m = _model()
    parallelize(m, Dist(), fp8=True, precision="bf16")
    assert all(isinstance(e.gmm, Float8GroupedMM) for e in m.modules() if isinstance(e, Experts))
