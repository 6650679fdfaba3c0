"""Muon (mellum2/train/muon.py) against torch.optim.Muon, the 3-D expert path against per-expert
Muon, the compiled chunk update against the eager one, the optimiser split of a Mellum2 and the
trainer's gradient clipping against torch's (mellum2/train/optim.py)."""
import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.train import Muon
from mellum2.train.muon import update_scale, zeropower, zeropower_looped
from mellum2.train.optim import build_optimizers, param_role


def _run(opt_cls, p0, grads, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48), (7, 130)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_2d_step_equals_torch_muon_bit_for_bit(shape, nesterov):
    torch.manual_seed(0)
    p0 = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(4)]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    ours, o1 = _run(Muon, p0, grads, **kw)
    ref, o2 = _run(torch.optim.Muon, p0, grads, **kw)
    assert torch.equal(ours, ref)
    assert torch.equal(o1.state[o1.param_groups[0]["params"][0]]["momentum_buffer"],
                       o2.state[o2.param_groups[0]["params"][0]]["momentum_buffer"])
    assert not torch.equal(ours, p0)


def test_2d_default_scale_equals_torch():
    torch.manual_seed(1)
    p0, grads = torch.randn(40, 24), [torch.randn(40, 24) for _ in range(2)]
    assert torch.equal(_run(Muon, p0, grads, lr=0.01)[0], _run(torch.optim.Muon, p0, grads, lr=0.01)[0])


def test_3d_expert_step_equals_per_expert_torch_muon():
    torch.manual_seed(2)
    E, R, C = 5, 24, 40
    p0 = torch.randn(E, R, C)
    grads = [torch.randn(E, R, C) for _ in range(3)]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours, _ = _run(Muon, p0, grads, **kw)
    for e in range(E):
        ref, _ = _run(torch.optim.Muon, p0[e], [g[e] for g in grads], **kw)
        assert torch.equal(ours[e], ref), f"expert {e}"


@pytest.mark.parametrize("chunk", [None, 2 * 24 * 40])  # one batch per shape; batches of 2 matrices
def test_bucketed_step_equals_per_matrix_torch_muon(chunk, monkeypatch):
    """Same-shaped matrices and expert stacks orthogonalised in one batch (or in chunks, as on a CPU),
    each as torch would."""
    from mellum2.train import muon

    if chunk is not None:
        monkeypatch.setattr(muon, "_CPU_CHUNK_NUMEL", chunk)
    torch.manual_seed(5)
    shapes = [(24, 40), (24, 40), (40, 24), (3, 24, 40), (24, 40), (2, 40, 24), (16, 16)]
    p0 = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    ps = [torch.nn.Parameter(x.clone()) for x in p0]
    opt = Muon(ps, lr=0.02, adjust_lr_fn="match_rms_adamw")
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    kw = dict(lr=0.02, adjust_lr_fn="match_rms_adamw")
    for i, (x, p) in enumerate(zip(p0, ps)):
        mats = [(x, [g[i] for g in grads])] if x.ndim == 2 else [(x[e], [g[i][e] for g in grads]) for e in range(x.shape[0])]
        ref = torch.stack([_run(torch.optim.Muon, m, gs, **kw)[0] for m, gs in mats])
        assert torch.equal(p.detach().reshape(ref.shape), ref), shapes[i]


def test_batched_newton_schulz_equals_loop_and_orthogonalises():
    torch.manual_seed(3)
    for shape in [(6, 16, 48), (6, 48, 16)]:
        g = torch.randn(shape)
        o = zeropower(g)
        assert torch.equal(o, zeropower_looped(g))
        s = torch.linalg.svdvals(o.float())
        assert 0.5 < s.min() and s.max() < 1.3  # the quintic lands singular values in ~[0.7, 1.2]


def _muon_steps(monkeypatch, compile_from, shapes, steps=3, **kw):
    from mellum2.train import muon

    monkeypatch.setattr(muon, "_COMPILE_FROM", compile_from)
    torch.manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(steps)]
    opt = Muon(ps, **{"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw", **kw})
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], [opt.state[p]["momentum_buffer"] for p in ps]


def test_compiled_chunks_match_the_eager_step(monkeypatch):
    """Chunks of >= _COMPILE_FROM elements run `_chunk_update` compiled (fused element-wise passes):
    the same momentum to fp32 rounding, the same update up to the bf16 Newton-Schulz's own noise."""
    from mellum2.train import muon

    shapes = [(6, 32, 64), (6, 32, 64), (4, 64, 32), (32, 64), (32, 64)]
    torch.manual_seed(5)
    start = [torch.randn(s) for s in shapes]  # what _muon_steps starts from
    monkeypatch.setattr(muon._compiled_chunk_update, "compiled", None)  # as if nothing had compiled it yet
    eager, eager_bufs = _muon_steps(monkeypatch, 1 << 40, shapes)
    assert muon._compiled_chunk_update.compiled is None  # nothing compiled: all chunks below the size
    compiled, compiled_bufs = _muon_steps(monkeypatch, 0, shapes)
    assert muon._compiled_chunk_update.compiled not in (None, False)  # compiled, and compiling worked
    for a, b in zip(eager_bufs, compiled_bufs):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # relative size of the difference of the updates (after 3 steps) against the updates themselves
    num = sum(((c - e) ** 2).sum() for c, e in zip(compiled, eager))
    den = sum(((e - s) ** 2).sum() for e, s in zip(eager, start))
    assert (num / den).sqrt() < 0.02  # measured 0.011
    # what the bound tells apart: an update 5% too large (lr 0.021) is 0.05 away; without Nesterov, 0.23
    for kw, least in ((dict(lr=0.021), 0.04), (dict(nesterov=False), 0.15)):
        other, _ = _muon_steps(monkeypatch, 1 << 40, shapes, **kw)
        num_other = sum(((o - e) ** 2).sum() for o, e in zip(other, eager))
        assert (num_other / den).sqrt() > least, kw


def test_update_scale_is_moonlight_per_matrix():
    assert update_scale((16, 128, 256), "match_rms_adamw") == pytest.approx(0.2 * 16)
    assert update_scale((256, 128), "match_rms_adamw") == pytest.approx(0.2 * 16)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        update_scale((2, 2), "nope")


def test_tensor_lr_matches_float_lr():
    torch.manual_seed(4)
    p0, grads = torch.randn(3, 16, 8), [torch.randn(3, 16, 8) for _ in range(2)]
    a, _ = _run(Muon, p0, grads, lr=0.01, adjust_lr_fn="match_rms_adamw")
    b, _ = _run(Muon, p0, grads, lr=torch.tensor(0.01), adjust_lr_fn="match_rms_adamw")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_rejects_vectors_and_bad_args():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="lr"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=-1)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], adjust_lr_fn="x")


def test_optimiser_split_of_mellum2():
    model = Mellum2(ModelConfig.from_preset("test-small"))
    roles = {n: param_role(n, p) for n, p in model.named_parameters()}
    assert roles["model.embed_tokens.weight"] == roles["lm_head.weight"] == "adamw_decay"
    assert roles["model.layers.1.mlp.gate.weight"] == "muon"  # router (docs/train.md)
    assert roles["model.layers.1.mlp.experts.gate_proj"] == "muon"
    assert roles["model.layers.0.mlp.gate_proj.weight"] == "muon"  # dense layer
    assert roles["model.layers.0.self_attn.q_proj.weight"] == "muon"
    assert roles["model.layers.0.self_attn.q_norm.weight"] == "adamw_nodecay"
    assert roles["mtp.fc.weight"] == "muon"
    opts = build_optimizers(model, 1e-3)
    n_opt = sum(p.numel() for o in opts.list for g in o.param_groups for p in g["params"])
    assert n_opt == model.num_params("all")  # every parameter exactly once
    assert all(p.ndim in (2, 3) for g in opts.muon.param_groups for p in g["params"])
    opts.set_lr(0.5)
    assert all(g["lr"] == 0.5 for o in opts.list for g in o.param_groups)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("max_norm", [1.0, 1e3, float("inf")])
def test_clip_grad_norm_matches_torch(compiled, max_norm, monkeypatch):
    """optim.clip_grad_norm (the trainer's; compiled for >= 1M gradient elements) against
    torch.nn.utils.clip_grad_norm_: same norm, same scaled gradients; inf only measures."""
    from mellum2.train import optim

    monkeypatch.setattr(optim, "_CLIP_COMPILE_FROM", 0 if compiled else 1 << 40)
    monkeypatch.setattr(optim._compiled_clip, "compiled", None)
    torch.manual_seed(6)
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(64, 32), (4, 16, 8), (100,), (3,)]]
    grads = [torch.randn(p.shape) * 3 for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    norm = optim.clip_grad_norm(ps + [torch.nn.Parameter(torch.zeros(2))], max_norm)  # one without grad
    ref_ps = [torch.nn.Parameter(torch.zeros(p.shape)) for p in ps]
    for p, g in zip(ref_ps, grads):
        p.grad = g.clone()
    ref = torch.nn.utils.clip_grad_norm_(ref_ps, max_norm)
    if compiled:
        assert optim._compiled_clip.compiled not in (None, False)  # compiled, and compiling worked
        torch.testing.assert_close(norm, ref, rtol=1e-6, atol=0)
        for p, r in zip(ps, ref_ps):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7)
    else:
        assert optim._compiled_clip.compiled is None
        assert torch.equal(norm, ref)
        assert all(torch.equal(p.grad, r.grad) for p, r in zip(ps, ref_ps))
    scaled = max_norm < norm
    assert scaled == (max_norm == 1.0)  # the case that clips is tested, and the others leave grads alone
    if not scaled:
        assert all(torch.equal(p.grad, g) for p, g in zip(ps, grads))


def test_clip_grad_norm_reports_a_non_finite_norm(monkeypatch):
    from mellum2.train import optim

    monkeypatch.setattr(optim, "_CLIP_COMPILE_FROM", 0)
    p = torch.nn.Parameter(torch.zeros(8, 8))
    p.grad = torch.ones(8, 8)
    p.grad[3, 3] = float("nan")
    assert not torch.isfinite(optim.clip_grad_norm([p], 1.0))
