"""MTP self-speculative decoding: the model's own MTP head drafts, the trunk verifies.

The MTP head at position t reads the trunk's hidden state h_t and the token x_{t+1} and predicts
x_{t+2} (model/mtp.py). After the trunk has produced x_{n} from h_{n-1}, the head drafts d_1 = x_{n+1}
from (h_{n-1}, x_n) without another trunk pass; with k > 1 the head is reused recurrently, its own
output standing in for the trunk state it does not have (DeepSeek-V3 / EAGLE style). The trunk then
runs once over [x_n, d_1..d_k] (k+1 tokens) and verifies all drafts:

- lossless rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft d_j drawn from q_j is
  accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn
  from norm(max(0, p_j - q_j)); when all k are accepted a bonus token is drawn from p_{k+1}. The
  emitted sequence is distributed exactly as plain sampling from p (tests/test_speculative.py).
- greedy rows are the special case p, q one-hot: a draft is kept iff it equals the trunk's argmax, and
  the correction is the argmax itself, so the output is plain greedy decoding token for token.

Then the MTP layer catches up over the k+1 verified positions (its cache must hold (h_t, x_{t+1}) for
every position, rejected tails are overwritten next step) and drafts the next block. Per step: one
trunk pass over k+1 tokens, one MTP pass over k+1 tokens, k-1 single-token MTP passes; 1..k+1 tokens
emitted. Rows advance by different amounts; the cache's per-row positions make that free.

Legend: B rows, k drafts, V vocab, D model width, T tokens.
"""
from __future__ import annotations

import torch

from .kvcache import KVCache
from .sampling import Sampler


def gather_rows(x_BT_, idx_B):
    """x[b, idx[b]] for every row: [B, T, ...] -> [B, ...]."""
    ar = torch.arange(x_BT_.shape[0], device=x_BT_.device)
    return x_BT_[ar, idx_B]


def draft(fwd, sampler: Sampler, cache: KVCache, y_BD, tok_B, n_B, k: int, hi: int):
    """k drafts from the MTP output y_BD at position n-1 (its draft predicts x_{n+1}); tok_B = x_n.
    Returns drafts [B, k] and the draft distributions q [B, k, V] they were drawn from (None when
    every row is plain greedy: then a draft is an argmax and no distribution is materialised).
    With a draft vocabulary (fwd.draft_vocab) the head scores only those ids; q is 0 elsewhere."""
    greedy = sampler is None or sampler.plain_greedy  # None: the compiled greedy step (engine)
    vocab = getattr(fwd, "draft_vocab", None)
    drafts, qs = [], []
    extra = tok_B[:, None][:, :0]
    for i in range(k):
        if i > 0:  # reuse the head: its own output stands in for the trunk state at position n+i-1
            y_BD = fwd.mtp(y_BD[:, None], drafts[-1][:, None], (n_B + i - 1)[:, None], cache, hi=hi)[:, 0]
        logits_B1V = fwd.mtp_head(y_BD[:, None], draft=True) if vocab is not None else fwd.mtp_head(y_BD[:, None])
        if greedy:
            d_B = logits_B1V[:, 0].argmax(-1)
            drafts.append(d_B if vocab is None else vocab[d_B])
            continue
        if vocab is not None:
            full = logits_B1V.new_full((*logits_B1V.shape[:2], sampler.V), float("-inf"))
            logits_B1V = full.scatter_(-1, vocab.expand(*logits_B1V.shape[:2], -1), logits_B1V)
        q_BV = sampler.probs(logits_B1V, extra)[:, 0]
        drafts.append(sampler.draw(q_BV[:, None])[:, 0])
        qs.append(q_BV)
        extra = torch.stack(drafts, 1)
    return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs else None)


def verify(sampler: Sampler, logits_BTV, drafts_Bk, q_BkV):
    """Rejection-sample the k drafts against the trunk's logits over [x_n, d_1..d_k] (T = k+1).

    Returns out_BT (the token at every position n+1..n+k+1 if accepted up to there: drafts, then the
    correction/bonus token; entries after it are that token repeated, unused), m_B (drafts accepted,
    0..k) and the target distributions p [B, T, V] (None on the plain greedy path)."""
    B, k = drafts_Bk.shape
    j_T = torch.arange(k + 1, device=drafts_Bk.device)
    if q_BkV is None:  # every row plain greedy: keep drafts while they equal the trunk's argmax
        a_BT = logits_BTV.argmax(-1)
        m_B = (drafts_Bk == a_BT[:, :k]).long().cumprod(1).sum(1)
        return torch.where(j_T <= m_B[:, None], a_BT, gather_rows(a_BT, m_B)[:, None]), m_B, None
    p_BTV = sampler.probs(logits_BTV, drafts_Bk)
    pd_Bk = p_BTV[:, :k].gather(-1, drafts_Bk[..., None])[..., 0]
    qd_Bk = q_BkV.gather(-1, drafts_Bk[..., None])[..., 0]
    u_Bk = sampler.uniform((B, k))
    acc_Bk = u_Bk * qd_Bk < pd_Bk  # u < p/q, without dividing by a q that may underflow
    m_B = acc_Bk.long().cumprod(1).sum(1)
    p_m = gather_rows(p_BTV, m_B)  # [B, V]
    q_m = gather_rows(torch.cat([q_BkV, torch.zeros_like(q_BkV[:, :1])], 1), m_B)  # q = 0 after the last draft
    resid = (p_m - q_m).clamp(min=0)
    mass = resid.sum(-1, keepdim=True)
    resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), p_m)  # mass 0 only if p == q: never rejected
    t_B = sampler.draw(resid[:, None])[:, 0]
    drafts_pad = torch.cat([drafts_Bk, t_B[:, None]], 1)
    out_BT = torch.where(j_T < m_B[:, None], drafts_pad, t_B[:, None])
    return out_BT, m_B, p_BTV


def speculative_step(fwd, sampler: Sampler | None, cache: KVCache, tok_B1, drafts_Bk, q_BkV, n_B, k: int, hi: int):
    """One speculative decode step, the same code eager and compiled (sampler None: every row plain
    greedy, no host sync inside, so it traces into one graph): the trunk verifies [x_n, d_1..d_k] at
    positions n..n+k, drafts are accepted (`verify`), the MTP layer runs over all k+1 positions (those
    after a row's accepted ones are rewritten before any query can see them), then the next k drafts.
    hi: host-known bound on the trunk's positions + 1. Returns (out_BT, m_B, logits_BTV, p_BTV, tok_B1,
    drafts_Bk, q_BkV, n_B): emitted tokens (the first m+1 of each row), drafts accepted, the trunk's
    logits and the distributions its tokens were drawn from (None: plain greedy), the newest token,
    the next drafts and their distributions, its position."""
    pos_BT = n_B[:, None] + torch.arange(k + 1, device=n_B.device)
    h_BTD = fwd.trunk(torch.cat([tok_B1, drafts_Bk], 1), pos_BT, cache, hi=hi)
    logits_BTV = fwd.head(h_BTD)
    out_BT, m_B, p_BTV = verify(sampler, logits_BTV, drafts_Bk, q_BkV)
    if sampler is not None and sampler.penalties:
        sampler.observe(out_BT, torch.arange(k + 1, device=n_B.device) <= m_B[:, None])
    y_BD = fwd.mtp(h_BTD, out_BT, pos_BT, cache, hi=hi, pick_B=m_B)[:, 0]
    tok_B = gather_rows(out_BT, m_B)
    n_B = n_B + m_B + 1
    drafts_Bk, q_BkV = draft(fwd, sampler, cache, y_BD, tok_B, n_B, k, hi=hi + k + 1)
    return out_BT, m_B, logits_BTV, p_BTV, tok_B[:, None], drafts_Bk, q_BkV, n_B
