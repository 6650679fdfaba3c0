"""MoE: the grouped (sorted dispatch + grouped_mm) path agrees with the per-expert loop reference."""
import pytest
import torch
import torch.nn.functional as F

from mellum2 import ModelConfig
from mellum2.model.moe import Experts, MoE, Router


def _moe(**kw):
    cfg = ModelConfig.from_preset("test-small2", **kw)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return cfg, m


def _assert_grouped_equals_loop(m, x):
    """Output and every gradient (input and parameters) of the grouped path equal the loop's, fp32."""
    outs, grads = [], []
    for impl in ("grouped", "loop"):
        m.experts.impl = impl
        m.zero_grad()
        x.grad = None
        y, _ = m(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    # fp32 sums in a different order: allow rounding relative to each tensor's scale (a leaked
    # padding row or a dropped token moves entries by that scale, far above this bound).
    for a, b in zip([outs[0], *grads[0]], [outs[1], *grads[1]]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("T", [1, 3, 37])
def test_grouped_equals_loop_forward_and_backward(T):
    cfg, m = _moe()
    _assert_grouped_equals_loop(m, torch.randn(2, T, cfg.hidden_size, requires_grad=True))


@pytest.mark.parametrize("pad", [4, 16])
def test_padded_groups_forward_and_backward_equal_loop(pad):
    """Groups padded to multiples of `pad` (what bf16 on a CPU uses), checked in fp32 so the bound
    is tight: padding rows (the zero row in, nothing back) and the unwritten rows past the last
    group must not reach the output or any gradient (the gather-based dispatch/combine backward)."""
    cfg, m = _moe()
    m.experts.pad_of = lambda *a: pad
    _assert_grouped_equals_loop(m, torch.randn(2, 29, cfg.hidden_size, requires_grad=True))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_grouped_without_grad_equals_loop(dtype, tol):
    """Without autograd (inference) gate and up are two grouped matmuls, not one over a copied
    concatenation: same output as the loop and as the training path."""
    cfg, m = _moe()
    m.to(dtype)
    x = torch.randn(1, 37, cfg.hidden_size, dtype=dtype)
    m.experts.impl = "grouped"
    train_path, _ = m(x)
    with torch.no_grad():
        a, _ = m(x)
        m.experts.impl = "loop"
        b, _ = m(x)
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(a.float(), train_path.detach().float(), rtol=tol, atol=tol)


def test_grouped_equals_loop_bf16_autocast():
    cfg, m = _moe()
    x = torch.randn(1, 50, cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.experts.impl = "grouped"
        a, _ = m(x)
        m.experts.impl = "loop"
        b, _ = m(x)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_unused_experts_and_all_tokens_on_one_expert():
    cfg, m = _moe()
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[0] = 10.0  # push every token to expert 0 (+ others for the remaining K-1 slots)
    x = torch.rand(1, 9, cfg.hidden_size) + 0.5
    m.experts.impl = "grouped"
    a, r = m(x)
    assert (r.ids[:, 0] == 0).all()
    m.experts.impl = "loop"
    b, _ = m(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_router_fp32_softmax_topk_renormalised():
    cfg = ModelConfig.from_preset("test-small")
    r = Router(cfg)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(5, cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs, w, ids = r(x)
    assert logits.dtype == probs.dtype == w.dtype == torch.float32
    ref = F.softmax(x @ r.weight.T, -1)
    torch.testing.assert_close(probs, ref)
    top, top_ids = ref.topk(cfg.num_experts_per_tok, -1)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(w, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(w.sum(-1), torch.ones(5))


@pytest.mark.parametrize("pad", [1, 4, 64])
def test_group_layout_contiguous_padded_groups(pad):
    from mellum2.model.moe import group_layout

    E, S = 6, 300
    ids = torch.randint(0, E, (S,))
    ids[ids == 3] = 2  # an empty group
    rows, offs, dest = group_layout(ids, E, pad)
    assert rows == S + (E * (pad - 1) if pad > 1 else 0)
    assert dest.unique().numel() == S and int(dest.max()) < int(offs[-1]) <= rows
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), offs[:-1]])
    counts = torch.bincount(ids, minlength=E)
    for e in range(E):
        mine = dest[ids == e]
        assert int(offs[e] - starts[e]) == (counts[e] + pad - 1) // pad * pad  # padded length
        # the expert's slots fill the front of its group, in slot order
        assert mine.tolist() == list(range(int(starts[e]), int(starts[e]) + int(counts[e])))


def test_padded_grouped_bf16_equals_loop_forward_and_backward():
    cfg = ModelConfig.from_preset("test-small2")
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(4, 256, cfg.hidden_size, requires_grad=True)
    S = x.shape[0] * x.shape[1] * cfg.num_experts_per_tok
    assert m.experts.pad_of(x.device, torch.bfloat16, S) > 1  # the padded layout is what is tested
    outs, grads = [], []
    for impl in ("grouped", "loop"):
        m.experts.impl = impl
        m.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = m(x)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach().float())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def test_expert_counts_equal_bincount():
    from mellum2.model.moe import expert_counts
    ids = torch.randint(0, 7, (5, 3))
    ids[0, 0] = 0
    counts = expert_counts(ids, 9)  # experts 7 and 8 unused: zeros, static length
    assert torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=9))


def test_moe_layer_traces_as_one_graph():
    """`--compile` compiles each decoder layer; a graph break inside the MoE (bincount's data-dependent
    shape used to cause one) splits it into several graphs, each with its own guards and autograd
    wrapper, and stops fusion across the break."""
    torch._dynamo.reset()
    cfg, m = _moe()
    x = torch.randn(1, 37, cfg.hidden_size, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_gate_up_cache_reused_until_the_weights_change():
    """The [gate; up] bf16 stack is built once per weight version: a second forward (a further
    micro-batch, a checkpointed recompute) reuses it, an optimiser's in-place update rebuilds it, and
    gradients equal those of the plain concatenation."""
    cfg = ModelConfig.from_preset("test-small")
    torch.manual_seed(0)
    ex = Experts(cfg)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(12, cfg.hidden_size)
    ids = torch.randint(0, cfg.num_experts, (12, cfg.num_experts_per_tok))
    w = torch.rand(12, cfg.num_experts_per_tok)
    grads = []
    for cache in (True, False):
        ex.cache_gate_up = cache
        ex.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ex(x, ids, w).float().square().sum().backward()
            first = ex._gate_up
            ex(x, ids, w).float().square().sum().backward()  # accumulates a second micro-batch
            assert (first is not None and ex._gate_up is first) if cache else ex._gate_up is None
        grads.append([p.grad.clone() for p in ex.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    ex.cache_gate_up = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ex(x, ids, w)
        before = ex._gate_up
        with torch.no_grad():
            ex.up_proj.mul_(2)  # what an optimiser step does
        ex(x, ids, w)
    assert ex._gate_up is not before
    assert torch.equal(ex._gate_up[:, cfg.moe_intermediate_size:].float(), ex.up_proj.detach().bfloat16().float())
    # reference: the plain autograd concatenation
    ex.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ex(x, ids, w).float().square().sum().backward()
    got = [p.grad.clone() for p in ex.parameters()]
    ex.zero_grad()
    ex.impl = "loop"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ex(x, ids, w).float().square().sum().backward()
    for a, b in zip(got, [p.grad for p in ex.parameters()]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
