"""Mellum 2's GRPO variant: the loss, the advantages, dynamic sampling and the reward shaping.

    loss, stats = grpo_loss(logp_BT, logp_old_BT, logp_infer_BT, adv_B, mask_BT)

Per response token t of a rollout i (B rollouts, T positions):

    r_t   = pi_theta(t) / pi_train_old(t)            the trainer's ratio (importance of the update)
    rho_t = pi_train_old(t) / pi_infer_old(t)        the trainer's vs the sampler's probability of the
                                                     sampled token, both under the sampling weights
    l_t   = -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i)     clip-higher (DAPO): 0.2 / 0.28
    loss  = sum_t [rho_t in [0.5, 5]] l_t / sum_t mask_t                 token-level normalisation

No KL term and no entropy bonus. IcePop masks a token whose rho lies outside the band (the sampler
and the trainer disagree: on an MoE, a router that flips between the two engines' numerics): it
contributes nothing, it is not clipped to the band's edge. The denominator counts every response
token of the batch (masked ones included), so a masked token does not re-weight the rest; with
micro-batches pass the whole step's count as `num_tokens`.

Advantages are leave-one-out (RLOO, Kool et al. 2019; Ahmadian et al. 2024), without GRPO's division
by the group's standard deviation: A_i = R_i - mean_{j != i} R_j. A group whose rewards all agree has
A = 0 for every member and teaches nothing; dynamic sampling (DAPO, Yu et al. 2025) drops it
(`informative`).

Reward shaping, applied before the advantages:
- DAPO's soft overlong penalty: a reply whose length falls in the last `buffer` tokens before the cap
  loses up to `floor` of its reward, linearly; a reply that hit the cap (no end token) is dropped
  from its group (`overlong_penalty` returns None for it).
- Concision: a correct reply without reasoning that uses reflection words ("wait", "actually", "hmm",
  "let me think", ...) loses 0.1 / 0.2 / 0.3 of its reward at 1-2 / 3-5 / 6+ of them (three tiers;
  the report gives the tiers' existence, not their bounds: ours).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

EPS_LOW, EPS_HIGH = 0.2, 0.28
ICEPOP = (0.5, 5.0)
REFLECTION = ("wait", "actually", "hmm", "let me think", "let me check", "let me re-check", "on second thought",
              "hold on", "double-check", "re-examine")
_REFLECTION = re.compile(r"\b(?:" + "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in REFLECTION) + r")\b", re.I)
# (minimum count, penalty): the highest tier reached applies
CONCISION_TIERS = ((1, 0.1), (3, 0.2), (6, 0.3))


def grpo_loss(logp, logp_old, logp_infer, advantages, mask, eps_low: float = EPS_LOW, eps_high: float = EPS_HIGH,
              icepop: tuple[float, float] | None = ICEPOP, num_tokens=None):
    """The policy loss (module docstring) and its statistics.

    logp [B, T]: log pi_theta of each sampled token (with gradient); logp_old [B, T]: log pi_train_old
    (the trainer's, under the weights that sampled); logp_infer [B, T]: the sampler's logprobs;
    advantages [B] or [B, T]; mask [B, T]: 1 on response tokens. icepop None: no mask. num_tokens: the
    normaliser (default mask.sum()).

    Returns (loss 0-d, stats) where stats holds 0-d tensors, detached: `tokens` (response tokens),
    `icepop_masked` (tokens masked by IcePop), `clipped` (kept tokens whose clip binds: r > 1 + eps_high
    with A > 0, or r < 1 - eps_low with A < 0: they pass no gradient), `clipped_high`, `clipped_low`;
    counts, so micro-batches add up."""
    if not (logp.shape == logp_old.shape == logp_infer.shape == mask.shape):
        raise ValueError(f"grpo_loss: logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)}, logp_infer "
                         f"{tuple(logp_infer.shape)} and mask {tuple(mask.shape)} must have one shape [B, T]")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"grpo_loss: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    mask_BT = mask.to(logp.dtype)
    adv_BT = advantages.to(logp.dtype)
    if adv_BT.dim() == 1:
        adv_BT = adv_BT[:, None]
    adv_BT = adv_BT.expand_as(logp)
    logp_old, logp_infer = logp_old.detach(), logp_infer.detach()
    ratio_BT = torch.exp(logp - logp_old)
    clipped_ratio_BT = ratio_BT.clamp(1 - eps_low, 1 + eps_high)
    loss_BT = -torch.minimum(ratio_BT * adv_BT, clipped_ratio_BT * adv_BT)
    keep_BT = mask_BT
    if icepop is not None:
        lo, hi = icepop
        rho_BT = torch.exp(logp_old - logp_infer)
        keep_BT = mask_BT * ((rho_BT >= lo) & (rho_BT <= hi)).to(logp.dtype)
    n = mask_BT.sum() if num_tokens is None else num_tokens
    loss = (loss_BT * keep_BT).sum() / torch.as_tensor(n, dtype=logp.dtype).clamp(min=1)
    with torch.no_grad():
        r = ratio_BT.detach()
        high = keep_BT * ((r > 1 + eps_high) & (adv_BT > 0)).to(logp.dtype)
        low = keep_BT * ((r < 1 - eps_low) & (adv_BT < 0)).to(logp.dtype)
        stats = {"tokens": mask_BT.sum(), "icepop_masked": (mask_BT - keep_BT).sum(),
                 "clipped": (high + low).sum(), "clipped_high": high.sum(), "clipped_low": low.sum()}
    return loss, stats


def loo_advantages(rewards) -> torch.Tensor:
    """Leave-one-out advantages of one group [G] (G >= 2): R_i - mean_{j != i} R_j, no std division.
    Equal to G / (G - 1) * (R_i - mean R)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    G = r.numel()
    if r.dim() != 1 or G < 2:
        raise ValueError(f"loo_advantages: expected a group of at least 2 rewards, got shape {tuple(r.shape)}")
    return r - (r.sum() - r) / (G - 1)


def informative(rewards: Sequence[float], min_size: int = 2) -> bool:
    """A group worth training on: at least `min_size` members and rewards that do not all agree."""
    return len(rewards) >= min_size and max(rewards) - min(rewards) > 1e-9


def select_groups(groups: Sequence, wanted: int, rewards_of=lambda g: g.rewards) -> tuple[list, int, int]:
    """Dynamic sampling: from the groups of an oversampled step (in sampling order), keep the first
    `wanted` informative ones; the surplus beyond the first `wanted` prompts refills the places of
    dropped ones. Returns (kept, dropped zero-variance or too small, surplus left unused)."""
    kept, dropped = [], 0
    for g in groups:
        if not informative(rewards_of(g)):
            dropped += 1
        elif len(kept) < wanted:
            kept.append(g)
    unused = len(groups) - dropped - len(kept)
    return kept, dropped, unused


def overlong_penalty(length: int, finished: bool, cap: int, buffer: int, floor: float = 1.0) -> float | None:
    """DAPO's soft overlong punishment of a reply of `length` tokens: 0 up to cap - buffer, then
    linearly down to -floor at the cap; None (drop the rollout) when it did not finish within the cap."""
    if not finished or length > cap:
        return None
    start = cap - buffer
    if buffer <= 0 or length <= start:
        return 0.0
    return -floor * (length - start) / buffer


def reflection_count(text: str) -> int:
    """How many reflection words or phrases `text` holds (case-insensitive, whole words)."""
    return len(_REFLECTION.findall(text or ""))


def concision_penalty(text: str, correct: bool, thinking: bool, tiers=CONCISION_TIERS) -> float:
    """The penalty (>= 0, subtracted from the reward) of a reply: only for a correct reply without
    reasoning, by the highest tier its reflection-word count reaches."""
    if not correct or thinking:
        return 0.0
    n = reflection_count(text)
    pen = 0.0
    for at_least, p in tiers:
        if n >= at_least:
            pen = p
    return pen


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in fp32 (the numerics the sampler's logprobs use)."""
    return logits_BTV.float().log_softmax(-1).gather(-1, targets_BT[..., None])[..., 0]


def entropy(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the distribution at each position [B, T], fp32."""
    lp = logits_BTV.float().log_softmax(-1)
    return -(lp.exp() * lp).sum(-1)
