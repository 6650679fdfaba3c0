"""The GRPO variant's pieces against hand-computed numbers: the loss (clipping on both sides, the
IcePop mask, token-level normalisation, which tokens pass a gradient), leave-one-out advantages,
dynamic sampling, the soft overlong and the concision penalties."""
from __future__ import annotations

import math

import pytest
import torch

from mellum2.posttrain import grpo_loss, loo_advantages
from mellum2.posttrain.grpo import (concision_penalty, informative, overlong_penalty, reflection_count,
                                    select_groups)

# Two rollouts of one group with rewards [1, 0]: leave-one-out advantages +1 and -1.
# Per token: the ratio r = pi / pi_old and IcePop's rho = pi_old / pi_infer; row 1's last token is padding.
R = [[1.1, 1.5, 0.5], [0.7, 1.5, 1.0]]
RHO = [[1.0, 1.0, 6.0], [0.4, 1.0, 1.0]]
MASK = [[1, 1, 1], [1, 1, 0]]


def _inputs():
    logp_old = torch.log(torch.tensor([[0.5, 0.25, 0.125], [0.5, 0.2, 0.1]], dtype=torch.float64))
    logp = (logp_old + torch.log(torch.tensor(R, dtype=torch.float64))).requires_grad_(True)
    logp_infer = logp_old - torch.log(torch.tensor(RHO, dtype=torch.float64))
    adv = loo_advantages([1.0, 0.0])
    return logp, logp_old, logp_infer, adv, torch.tensor(MASK, dtype=torch.float64)


def test_loss_by_hand_with_icepop():
    logp, logp_old, logp_infer, adv, mask = _inputs()
    assert adv.tolist() == [1.0, -1.0]
    loss, st = grpo_loss(logp, logp_old, logp_infer, adv, mask)
    # row 0 (A = +1): r 1.1 -> -1.1; r 1.5 -> clipped at 1.28 -> -1.28; r 0.5 (no lower clip for A > 0) but
    #   rho 6 > 5: masked. Row 1 (A = -1): r 0.7 -> clipped at 0.8 -> +0.8 but rho 0.4 < 0.5: masked;
    #   r 1.5 (no upper clip for A < 0) -> +1.5. Sum -1.1 - 1.28 + 1.5 = -0.88 over 5 response tokens.
    assert loss.item() == pytest.approx(-0.88 / 5, abs=1e-12)
    assert st["tokens"].item() == 5 and st["icepop_masked"].item() == 2
    assert st["clipped"].item() == 1 and st["clipped_high"].item() == 1 and st["clipped_low"].item() == 0
    loss.backward()
    # d loss / d logp = -A r / N where the token is kept and its clip does not bind, else 0
    want = [[-1.1 / 5, 0, 0], [0, 1.5 / 5, 0]]
    for got_row, want_row in zip(logp.grad.tolist(), want):
        assert got_row == pytest.approx(want_row, abs=1e-12)


def test_loss_by_hand_without_icepop():
    logp, logp_old, logp_infer, adv, mask = _inputs()
    loss, st = grpo_loss(logp, logp_old, logp_infer, adv, mask, icepop=None)
    # every response token: -1.1 - 1.28 - 0.5 + 0.8 + 1.5 = -0.58
    assert loss.item() == pytest.approx(-0.58 / 5, abs=1e-12)
    assert st["icepop_masked"].item() == 0
    assert st["clipped_high"].item() == 1 and st["clipped_low"].item() == 1
    loss.backward()
    want = [[-1.1 / 5, 0, -0.5 / 5], [0, 1.5 / 5, 0]]
    for got_row, want_row in zip(logp.grad.tolist(), want):
        assert got_row == pytest.approx(want_row, abs=1e-12)


def test_symmetric_clip_and_token_normalisation():
    logp, logp_old, logp_infer, adv, mask = _inputs()
    # eps_high 0.2: row 0's r 1.5 clips at 1.2 instead of 1.28
    loss, _ = grpo_loss(logp, logp_old, logp_infer, adv, mask, eps_high=0.2)
    assert loss.item() == pytest.approx((-1.1 - 1.2 + 1.5) / 5, abs=1e-12)
    # the normaliser is the token count of the whole batch (micro-batches: the step's count)
    loss, _ = grpo_loss(logp, logp_old, logp_infer, adv, mask, num_tokens=10)
    assert loss.item() == pytest.approx(-0.88 / 10, abs=1e-12)
    # per-token (not per-sequence) normalisation: a longer rollout weighs more
    lp = torch.zeros(2, 4, requires_grad=True)
    m = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])
    loss, _ = grpo_loss(lp, lp.detach(), lp.detach(), torch.tensor([1.0, 1.0]), m)
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-0.2] * 5 + [0.0] * 3)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


def test_leave_one_out_by_hand():
    a = loo_advantages([1.0, 0.0, 0.0, 1.0])
    assert a.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    a = loo_advantages([0.5, 1.0, 0.0])
    assert a.tolist() == pytest.approx([0.0, 0.75, -0.75])
    # no std normalisation: scaling the rewards scales the advantages
    assert loo_advantages([0.0, 0.1]).tolist() == pytest.approx([-0.1, 0.1])
    assert loo_advantages([3.0, 3.0, 3.0]).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="at least 2"):
        loo_advantages([1.0])


class G:
    def __init__(self, name, rewards):
        self.name, self.rewards = name, rewards


def test_dynamic_sampling_drops_agreeing_groups_and_refills_from_surplus():
    assert not informative([1, 1, 1]) and not informative([0, 0]) and not informative([1])
    assert informative([0, 1]) and informative([0.5, 0.4])
    # 6 prompts sampled for 4 places (1.5x): two agree, the surplus fills their places in order
    gs = [G("a", [1, 0]), G("b", [1, 1]), G("c", [0, 0]), G("d", [0, 1]), G("e", [0.2, 0]), G("f", [1, 0]),
          G("g", [0, 0.5])]
    kept, dropped, unused = select_groups(gs, 4)
    assert [g.name for g in kept] == ["a", "d", "e", "f"] and dropped == 2 and unused == 1
    # not enough informative groups: train on what there is
    kept, dropped, unused = select_groups(gs[:4], 4)
    assert [g.name for g in kept] == ["a", "d"] and dropped == 2 and unused == 0
    # a group left with one member (the others dropped as overlong) teaches nothing
    kept, dropped, _ = select_groups([G("x", [1.0])], 1)
    assert kept == [] and dropped == 1


def test_overlong_penalty_by_hand():
    # cap 100, buffer 20: no penalty up to 80, then linear to -1 at 100; unfinished: dropped
    assert overlong_penalty(50, True, 100, 20) == 0.0
    assert overlong_penalty(80, True, 100, 20) == 0.0
    assert overlong_penalty(90, True, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, True, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(95, True, 100, 20, floor=0.4) == pytest.approx(-0.3)
    assert overlong_penalty(100, False, 100, 20) is None
    assert overlong_penalty(100, True, 100, 0) == 0.0


def test_concision_penalty_tiers():
    assert reflection_count("Wait, actually it is 5. Hmm, let me  think. Awaited, factually.") == 4
    assert concision_penalty("The answer is 5.", True, False) == 0.0
    assert concision_penalty("Wait. The answer is 5.", True, False) == 0.1
    assert concision_penalty("Wait, actually, hmm: 5.", True, False) == 0.2
    assert concision_penalty("wait " * 6, True, False) == 0.3
    assert concision_penalty("wait " * 20, True, False) == 0.3
    # only correct replies without reasoning
    assert concision_penalty("wait " * 6, False, False) == 0.0
    assert concision_penalty("wait " * 6, True, True) == 0.0
    assert math.isclose(1.0 - concision_penalty("Hmm, hold on. Double-check: 5.", True, False), 0.8)
