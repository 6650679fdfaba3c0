"""Warmup-Hold-Decay (mellum2/train/schedule.py): values at the phase boundaries."""
import pytest

from mellum2.train.data import SyntheticLoader, phase_boundaries
from mellum2.train.schedule import WarmupHoldDecay


def test_values_at_phase_boundaries():
    tps = 1000
    total = 100 * tps
    b = phase_boundaries(total)  # 58% / 26% / 16%
    assert b == [58_000, 84_000, 100_000]
    s = WarmupHoldDecay.from_phase_boundaries(3e-4, 10, b, tps)
    assert (s.decay_start, s.total_steps) == (84, 100)
    assert s(0) == pytest.approx(3e-5)  # warmup: (s + 1) / 10
    assert s(4) == pytest.approx(1.5e-4)
    assert s(9) == 3e-4  # end of warmup reaches the peak exactly
    assert s(57) == s(58) == s(83) == 3e-4  # hold through phases 1 and 2, across their boundary
    assert s(84) == 3e-4  # first step of phase 3 starts the decay from the peak
    assert s(92) == pytest.approx(3e-4 * 8 / 16)
    assert s(99) == pytest.approx(3e-4 / 16)  # last step
    assert s(100) == 0.0 and s(10_000) == 0.0  # exactly 0 at the end boundary
    lrs = [s(i) for i in range(84, 101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly linear decrease
    diffs = {round(a - b, 12) for a, b in zip(lrs, lrs[1:])}
    assert len(diffs) == 1


def test_boundary_inside_a_step_rounds_up():
    # phase 3 starting in the middle of step 16 -> the decay starts with step 17
    s = WarmupHoldDecay.from_phase_boundaries(1.0, 0, [1150, 1680, 2000], 100)
    assert (s.decay_start, s.total_steps) == (17, 20)
    assert s(16) == 1.0 and s(17) == 1.0 and s(18) < 1.0 and s(20) == 0.0


def test_driven_by_the_loader_boundaries():
    ld = SyntheticLoader(batch_size=2, seq_len=16, total_tokens=32 * 50, vocab_size=64)
    s = WarmupHoldDecay.from_phase_boundaries(1.0, 5, ld.phase_boundaries, ld.tokens_per_batch)
    phases = []
    for _ in range(50):
        next(ld)
        phases.append(ld.phase)
    first3 = phases.index(2)
    assert s.decay_start == first3  # the decay starts with the first batch of phase 3
    assert s(first3 - 1) == 1.0 and s(first3 + 1) < 1.0


def test_bad_boundaries_are_errors():
    with pytest.raises(ValueError, match="non-decreasing"):
        WarmupHoldDecay.from_phase_boundaries(1.0, 0, [5, 3, 10], 1)
    with pytest.raises(ValueError, match="expected 3"):
        WarmupHoldDecay.from_phase_boundaries(1.0, 0, [5, 10], 1)
    with pytest.raises(ValueError, match="decay_start"):
        WarmupHoldDecay(1.0, 0, 11, 10)
