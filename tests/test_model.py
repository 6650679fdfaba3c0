"""Mellum2 forward: packing, sliding window, MTP wiring, the loss terms, meta-device build, init."""
import math
import time

import pytest
import torch
import torch.nn.functional as F

from mellum2 import Mellum2, ModelConfig
from mellum2.model.layers import attn_mask, doc_ids_from_positions
from mellum2.model.transformer import load_balance_loss


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return Mellum2(ModelConfig.from_preset("test-small")).eval()


def test_packed_documents_equal_separate_forwards(small):
    a = torch.randint(0, 256, (1, 23))
    b = torch.randint(0, 256, (1, 17))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(23), torch.arange(17)])[None]
    with torch.no_grad():
        lp = small(packed, position_ids=pos).logits
        la, lb = small(a).logits, small(b).logits
    torch.testing.assert_close(lp[:, :23], la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp[:, 23:], lb, rtol=1e-5, atol=1e-5)
    # without position_ids the second document sees the first: the outputs differ
    with torch.no_grad():
        assert not torch.allclose(small(packed).logits[:, 23:], lb, atol=1e-3)


def test_masks_window_and_documents(small):
    """attn_mask: causal, keys at index distance < window, never across a document boundary."""
    W = small.cfg.sliding_window
    m = attn_mask(12, W, None, "cpu")[0, 0]
    assert m[11].tolist() == [False] * (12 - W) + [True] * W
    assert m[3].tolist() == [True] * 4 + [False] * 8
    doc = doc_ids_from_positions(torch.tensor([[0, 1, 2, 0, 1, 5, 6]]))
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 2]]
    md = attn_mask(7, None, doc, "cpu")[0, 0]
    assert md[4].tolist() == [False, False, False, True, True, False, False]


def test_mtp_inputs_are_next_token_and_hidden(small):
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        out = small(ids, mtp=True)
        # reference: MTP position t from h_t and embed(x_{t+1})
        mtp = small.mtp
        e = mtp.pre_fc_norm_embedding(small.model.embed_tokens(ids[:, 1:]))
        h = mtp.pre_fc_norm_hidden(out.hidden[:, :-1])
        z = mtp.fc(torch.cat([e, h], -1))
        pos = torch.arange(11).expand(2, 11)
        cos, sin = small.rotary(pos, "full_attention", z.dtype)
        y, _ = mtp.layers[0](z, cos, sin, None)
        ref = small.lm_head(mtp.norm(y))
    assert out.mtp_logits.shape == (2, 11, 256)
    torch.testing.assert_close(out.mtp_logits, ref, rtol=1e-5, atol=1e-5)


def test_loss_terms(small):
    cfg = small.cfg
    ids = torch.randint(0, 256, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100  # a loss mask
    out = small(ids, labels=labels)
    L = out.losses
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    mtp = F.cross_entropy(out.mtp_logits[:, :-1].reshape(-1, 256), labels[:, 2:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(L["ce"], ce)
    torch.testing.assert_close(L["mtp"], mtp)
    assert out.n_tokens.item() == (labels[:, 1:] != -100).sum().item()
    n_moe = cfg.mlp_layer_types.count("sparse") + 1  # + the MTP layer
    assert len(out.routers) == n_moe
    z = torch.stack([torch.logsumexp(r.logits, -1).pow(2).mean() for r in out.routers]).mean()
    torch.testing.assert_close(L["z"], z)
    total = ce + cfg.mtp_loss_weight * mtp + cfg.router_aux_loss_coef * L["lb"] + cfg.router_z_loss_coef * z
    torch.testing.assert_close(out.loss, total)
    out.loss.backward()
    assert small.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0  # routers get gradients
    assert small.mtp.fc.weight.grad.abs().sum() > 0
    small.zero_grad()


def test_load_balance_loss_values():
    class R:  # a hand-made router output: 4 tokens, 4 experts, top-2
        def __init__(self, ids, probs):
            self.ids, self.probs = ids, probs
    uniform = torch.full((4, 4), 0.25)
    balanced = R(torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), uniform)
    assert load_balance_loss([balanced], 4).item() == pytest.approx(1.0)
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(4, 4)
    collapsed = R(torch.tensor([[0, 1]] * 4), p)
    # f = (0.5, 0.5, 0, 0), P = (0.7, 0.1, .1, .1) -> 4 * (0.35 + 0.05) = 1.6
    assert load_balance_loss([collapsed], 4).item() == pytest.approx(1.6)
    # global counts (as summed over ranks by count_reducer) replace the local ones
    red = load_balance_loss([collapsed], 4, count_reducer=lambda c: c + torch.tensor([[0., 0., 4., 4.]]))
    assert red.item() == pytest.approx(4 * (0.25 * 0.7 + 0.25 * 0.1 + 0.25 * 0.1 + 0.25 * 0.1))


def test_all_labels_masked_gives_zero_ce(small):
    ids = torch.randint(0, 256, (1, 8))
    out = small(ids, labels=torch.full_like(ids, -100))
    assert out.losses["ce"].item() == 0.0 and out.n_tokens.item() == 0


def test_bf16_autocast_close_to_fp32(small):
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        a = small(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = small(ids).logits
    assert b.dtype == torch.float32  # logits are fp32 by policy
    assert (a - b).abs().max() < 0.05 * a.abs().max() + 0.02


def test_meta_build_of_12b_is_fast_and_exact():
    t = time.time()
    with torch.device("meta"):
        m = Mellum2(ModelConfig.from_preset("mellum2-12b"))
    assert m.num_params() == 12_149_923_072
    assert m.num_params("mtp") > 0 and m.num_params("all") == m.num_params() + m.num_params("mtp")
    assert time.time() - t < 20
    assert all(p.is_meta for p in m.parameters())


def test_init_statistics():
    cfg = ModelConfig.from_preset("tiny")
    m = Mellum2(cfg)
    s = cfg.initializer_range
    s_out = s / math.sqrt(2 * (cfg.num_hidden_layers + 1))
    assert m.model.embed_tokens.weight.std().item() == pytest.approx(s, rel=0.02)
    assert m.model.layers[0].mlp.experts.gate_proj.std().item() == pytest.approx(s, rel=0.02)
    assert m.model.layers[0].mlp.experts.down_proj.std().item() == pytest.approx(s_out, rel=0.02)
    assert m.model.layers[0].self_attn.o_proj.weight.std().item() == pytest.approx(s_out, rel=0.05)
    assert torch.all(m.model.layers[0].self_attn.q_norm.weight == 1)
    assert torch.all(m.mtp.norm.weight == 1)


@pytest.mark.parametrize("window, packed, block", [(None, True, 16), (8, False, 8), (8, True, 5), (3, True, 64)])
def test_blocked_attention_equals_dense_mask(window, packed, block):
    from mellum2.model.layers import blocked_attention
    B, H, G, T, d = 2, 4, 2, 50, 8
    q = torch.randn(B, H, T, d, requires_grad=True)
    k = torch.randn(B, G, T, d, requires_grad=True)
    v = torch.randn(B, G, T, d, requires_grad=True)
    doc = doc_ids_from_positions(torch.cat([torch.arange(20), torch.arange(30)]).expand(B, T)) if packed else None
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask(T, window, doc, "cpu"), enable_gqa=True)
    blocked = blocked_attention(q, k, v, window, doc, block)
    torch.testing.assert_close(blocked, dense, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(dense)
    ga = torch.autograd.grad(dense, (q, k, v), g)
    gb = torch.autograd.grad(blocked, (q, k, v), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the last queries of a longer key sequence (a cache holding earlier positions)
    tail = blocked_attention(q[:, :, 40:], k, v, window, doc, block)
    torch.testing.assert_close(tail, dense[:, :, 40:], rtol=1e-5, atol=1e-6)


def test_long_sequences_take_the_blocked_path(small, monkeypatch):
    from mellum2.model.layers import MaskCache
    ids = torch.randint(0, 256, (1, 70))
    pos = torch.cat([torch.arange(30), torch.arange(40)])[None]
    with torch.no_grad():
        dense = small(ids, position_ids=pos).logits
        monkeypatch.setattr(MaskCache, "dense_max", 16)
        plans = MaskCache(small.cfg, 70, doc_ids_from_positions(pos), "cpu")
        assert plans.get("sliding_attention").kind == "blocked" and plans.get("full_attention").kind == "blocked"
        blocked = small(ids, position_ids=pos).logits
    torch.testing.assert_close(blocked, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_qkv_training_path_equals_separate_projections(autocast):
    """Training computes q, k, v with one matmul on the concatenated weights; the loss and every
    gradient equal those of the three separate projections (tight in fp32, bf16 rounding else)."""
    from mellum2 import kernels

    torch.manual_seed(0)
    model = Mellum2(ModelConfig.from_preset("test-small")).train()
    ids = torch.randint(0, 256, (2, 24))
    results = []
    for fused in (True, False):
        kernels.install(model, attention="sdpa", experts=False, fuse_qkv=fused)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    tol = 2e-2 if autocast else 1e-5
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert results[0][1].abs().sum() > 0


def test_packed_hint_equals_finding_out():
    """The trainer's host-side `packed` flag (train/trainer.py) gives the masks the model would find
    itself, and the same loss, for packed and unpacked rows."""
    from mellum2.model.decoder import packed_doc_ids

    cfg = ModelConfig.from_preset("test-small")
    model = Mellum2(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    plain = torch.arange(12).expand(2, 12)
    packed = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    for pos in (plain, packed):
        flag = bool((pos.diff(dim=-1) != 1).any())  # what the trainer computes
        assert flag == (packed_doc_ids(pos) is not None)
        found, hinted = packed_doc_ids(pos), packed_doc_ids(pos, flag)
        assert (found is None and hinted is None) or torch.equal(found, hinted)
        a = model(ids, labels=ids, position_ids=pos).loss
        b = model(ids, labels=ids, position_ids=pos, packed=flag).loss
        assert torch.equal(a, b)
