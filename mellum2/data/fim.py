"""Fill-in-the-middle (FIM) transformation of token sequences (Bavarian et al. 2022, "Efficient
Training of Language Models to Fill in the Middle"; StarCoder's sentinel spellings).

A document is cut at two points drawn uniformly from [0, n] into prefix / middle / suffix and
rearranged, 50/50, into

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

(SPM is the paper's "SPM variant 2", the one SantaCoder/StarCoder train on: in both modes the model
generates the middle right after `<fim_middle>`, and in SPM the prefix is the start of that stream.)

Our decision where the report is silent: cuts are made on *tokens*, at load time, not on characters
before tokenisation. Tokens are what the shards store, so FIM can be applied at any rate in any phase
without re-tokenising, and the three parts reassemble to exactly the original ids (tested). The cost
is that a cut never falls inside a token; at inference a cursor inside a word is handled by ending the
prefix at a token boundary (token healing), see docs/data.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PSM, SPM = 1, 2  # modes; 0 = no FIM
OVERHEAD = 3  # sentinel tokens added by either mode


@dataclass(frozen=True)
class FimIds:
    prefix: int
    middle: int
    suffix: int

    @classmethod
    def from_special(cls, special_ids: dict) -> "FimIds":
        try:
            return cls(int(special_ids["fim_prefix"]), int(special_ids["fim_middle"]), int(special_ids["fim_suffix"]))
        except KeyError as e:
            raise ValueError(f"FimIds: special_ids has no {e.args[0]!r} entry") from None


def draw_cuts(n: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two cut points uniform on [0, n], sorted: prefix = [0, i), middle = [i, j), suffix = [j, n)."""
    a, b = rng.integers(0, n + 1, size=2)
    return (int(a), int(b)) if a <= b else (int(b), int(a))


def apply_fim(ids: np.ndarray, i: int, j: int, mode: int, fim: FimIds) -> np.ndarray:
    """The PSM or SPM arrangement of `ids` cut at i <= j (len(result) == len(ids) + 3)."""
    ids = np.asarray(ids, dtype=np.int64)
    if not 0 <= i <= j <= len(ids):
        raise ValueError(f"apply_fim: cuts must satisfy 0 <= i <= j <= {len(ids)}, got i={i}, j={j}")
    pre, mid, suf = ids[:i], ids[i:j], ids[j:]
    P, M, S = ([t] for t in (fim.prefix, fim.middle, fim.suffix))
    if mode == PSM:
        parts = (P, pre, S, suf, M, mid)
    elif mode == SPM:
        parts = (P, S, suf, M, pre, mid)
    else:
        raise ValueError(f"apply_fim: mode must be PSM ({PSM}) or SPM ({SPM}), got {mode}")
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def undo_fim(seq: np.ndarray, fim: FimIds) -> np.ndarray:
    """The original ids of a PSM or SPM sequence (documents never contain sentinel ids themselves:
    the pipeline encodes corpus text with allow_special=False)."""
    seq = np.asarray(seq, dtype=np.int64)
    if len(seq) < OVERHEAD or seq[0] != fim.prefix:
        raise ValueError("undo_fim: sequence does not start with <fim_prefix>")
    s_at = np.flatnonzero(seq == fim.suffix)
    m_at = np.flatnonzero(seq == fim.middle)
    if len(s_at) != 1 or len(m_at) != 1 or s_at[0] > m_at[0]:
        raise ValueError("undo_fim: expected one <fim_suffix> before one <fim_middle>")
    s_at, m_at = int(s_at[0]), int(m_at[0])
    if s_at == 1:  # SPM: <P><S> suffix <M> prefix+middle
        return np.concatenate([seq[m_at + 1:], seq[2:m_at]])
    return np.concatenate([seq[1:s_at], seq[m_at + 1:], seq[s_at + 1:m_at]])  # PSM
