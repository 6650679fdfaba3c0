"""model/objective.py: the one training objective. The model's `out.loss`, a micro-batch's share of a
global step (the trainer) and the logged loss are the same weighted sum, and a micro-batch's share
gives exactly the gradients of the formula written out by hand."""
import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.model.objective import StepShare, label_counts, loss_weights, objective

pytestmark = pytest.mark.usefixtures("one_thread")


def test_model_loss_is_the_objective_of_its_terms():
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small"))
    ids = torch.randint(0, m.cfg.vocab_size, (2, 24))
    out = m(ids, labels=ids)
    L, cfg = out.losses, m.cfg
    assert set(L) == {"ce", "mtp", "lb", "z"}
    assert torch.equal(out.loss, objective(L, loss_weights(cfg)))
    by_hand = L["ce"] + 0.1 * L["mtp"] + 1e-3 * L["lb"] + 1e-3 * L["z"]
    torch.testing.assert_close(out.loss, by_hand, rtol=1e-6, atol=0)


def test_step_share_gradients_equal_the_formula_by_hand():
    """W ranks x K micro-batches: W ce n / N + W w_mtp mtp n2 / N2 + (c_lb lb + c_z z) / K."""
    w = {"ce": 1, "mtp": 0.1, "lb": 1e-3, "z": 1e-3}
    labels = torch.tensor([[5, -100, 7, 8, 9], [-100, 4, 1, 2, -100]])
    n = label_counts(labels)
    assert n["ce"].item() == 6 and n["mtp"].item() == 5  # labels[:, 1:] and labels[:, 2:] that are not -100
    total = {"ce": torch.tensor(17.0), "mtp": torch.tensor(13.0)}
    W, K = 2, 3
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        leaves = {k: (torch.rand((), generator=g) * 5).requires_grad_() for k in w}
        objective(leaves, w, StepShare(n, total, W, K)).backward()
        ours = {k: v.grad.clone() for k, v in leaves.items()}
        for v in leaves.values():
            v.grad = None
        L = leaves
        ref = W * L["ce"] * n["ce"] / total["ce"] + W * w["mtp"] * L["mtp"] * n["mtp"] / total["mtp"] \
            + (w["lb"] * L["lb"] + w["z"] * L["z"]) / K
        ref.backward()
        for k in w:
            assert torch.equal(ours[k], L[k].grad), k


def test_floats_terms_and_missing_ones():
    w = {"ce": 1, "mtp": 0.1, "lb": 1e-3, "z": 1e-3}
    assert objective({"ce": 2.0, "lb": 1.0, "z": 4.0}, w) == 2.0 + 1e-3 * 1.0 + 1e-3 * 4.0  # no MTP head
    assert objective({"mtp": 3.0}, {**w, "mtp": 1}) == 3.0  # train-mtp weighs its own loss 1
    with pytest.raises(ValueError, match="none of the terms"):
        objective({}, w)
