"""The engine's KV pool: one KVCache whose rows are request slots, and the per-slot decode state
beside it (the newest token and its position, the MTP drafts and the distributions they were drawn
from), so a step over rows a..b-1 reads and writes slices of these tensors and a view of the cache.

Rows are kept contiguous by the engine: when a request leaves, a later row moves into its place
(`move`: its used KV and its state), so every forward is over a slice, never a gather.

Shapes: S slots (rows), k drafts, V vocab.
"""
from __future__ import annotations

import torch

from .kvcache import KVCache


class Pool(KVCache):
    def __init__(self, cfg, rows: int, capacity: int, dtype, device, k: int, speculative: bool):
        super().__init__(cfg, rows, capacity, dtype, device, step_tokens=k + 1 if speculative else 1,
                         mtp=speculative)
        self.draft_tokens, self.vocab = k, cfg.vocab_size
        self.tok_S1 = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.n_S = torch.zeros(rows, dtype=torch.long, device=device)
        self.drafts_Sk = torch.zeros(rows, k, dtype=torch.long, device=device)
        self.q_SkV = None  # allocated when a sampled row first drafts
        self.q_ok = [False] * rows  # False: the row's drafts were greedy (q is their one-hot, made on demand)
        self._views: dict = {}

    def fits(self, capacity: int, k: int, speculative: bool, dtype, device) -> bool:
        return (self.capacity >= capacity and self.step_tokens >= (k + 1 if speculative else 1)
                and self.draft_tokens == k and (self.has_mtp or not speculative)
                and (self.dtype, self.device) == (dtype, torch.device(device)))

    def view(self, a: int, b: int, fresh: bool = False) -> KVCache:
        """Rows a..b-1 as a cache (one object per range: the compiled steps capture it)."""
        if fresh:
            return self.rows(a, b, fresh=True)
        v = self._views.get((a, b))
        if v is None:
            v = self._views[(a, b)] = self.rows(a, b)
        return v

    def move(self, src: int, dst: int, upto: int) -> None:
        """Row src's KV (full layers up to position `upto`) and state into row dst."""
        self.move_row(src, dst, upto)
        for x in (self.tok_S1, self.n_S, self.drafts_Sk, self.q_SkV):
            if x is not None:
                x[dst] = x[src]
        self.q_ok[dst] = self.q_ok[src]

    def q_rows(self, a: int, b: int) -> torch.Tensor:
        """The draft distributions of rows a..b-1 [B, k, V] (one-hot of a greedy draft)."""
        self._alloc_q()
        for i in range(a, b):
            if not self.q_ok[i]:
                self.q_SkV[i].zero_().scatter_(-1, self.drafts_Sk[i][:, None], 1.0)
                self.q_ok[i] = True
        return self.q_SkV[a:b]

    def set_q(self, a: int, b: int, q_BkV: torch.Tensor | None) -> None:
        if q_BkV is None:
            self.q_ok[a:b] = [False] * (b - a)
            return
        self._alloc_q()
        self.q_SkV[a:b] = q_BkV
        self.q_ok[a:b] = [True] * (b - a)

    def _alloc_q(self) -> None:
        if self.q_SkV is None:
            self.q_SkV = torch.zeros(self.batch, self.draft_tokens, self.vocab, device=self.device)
