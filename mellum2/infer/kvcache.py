"""Preallocated KV cache with per-row positions: full layers hold the whole context, sliding layers a
ring buffer, so their memory stays flat however long the context grows.

It implements the model's cache protocol (`attend(layer_idx, q, k, v) -> o`, see model/layers.py):
the model stays cache-agnostic and this object stores k/v and computes the attention itself.

Layout (gpt-fast style static cache): per layer one k and one v tensor [B, G, S, d], allocated once.
- full-attention layers (and the MTP layer, index L = num_hidden_layers): S = capacity, slot = position.
- sliding layers: S = R = min(capacity, W + step_tokens - 1), slot = position mod R. A step that
  writes `step_tokens` tokens before attending still finds the W keys its oldest query needs, and what
  it overwrites (positions <= p - W) no query needs again, even after speculative tokens are rejected.
  `ring_pos_BR` records which position every slot holds (EMPTY: nothing yet).

Per-row positions, not left padding: each row writes at its own positions, so prompts of different
lengths need no padding mask at decode, rows may advance by different amounts (speculative decoding)
and a finished row could later be refilled with a new request (continuous batching). Batched prefill
right-pads the prompts: in full layers pads sit at positions after a row's last real token, so no
real query sees them (causality) and the decode steps overwrite them before any query could; the
rings never store pads (they could wrap onto live slots), see the overflow path.

A step is `begin(pos_BT, ...)` (masks and slots once for all layers), then the forward pass calls
`attend` per layer. Two attention paths:
- in place (decode, speculative verify, short chunks): write k/v, then SDPA on the cache with a mask;
  static shapes and no host syncs, so the step can be captured (CUDA graphs / torch.compile).
- overflow (a prefill chunk longer than a ring has room for, or one with padding): the sliding
  layers attend over [ring ; chunk] (the chunk alone while the rings are empty) and then keep each
  row's last R real positions. Prefill only; it may sync.

Shapes: B rows, T tokens this step, S slots, R ring slots, H query heads, G kv heads, d head_dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mellum2.model.config import ModelConfig


EMPTY = -(1 << 40)  # the position an empty ring slot holds: farther than any window from every query


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype=torch.float32, device="cpu",
                 step_tokens: int = 1, mtp: bool = False):
        if capacity < 1 or batch < 1 or step_tokens < 1:
            raise ValueError(f"KVCache: batch, capacity and step_tokens must be >= 1, got "
                             f"batch={batch} capacity={capacity} step_tokens={step_tokens}")
        self.cfg, self.batch, self.capacity, self.step_tokens = cfg, batch, capacity, step_tokens
        self.has_mtp = mtp
        self.dtype, self.device = dtype, torch.device(device)
        G, d = cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window
        self.ring = min(capacity, self.window + step_tokens - 1) if "sliding_attention" in cfg.layer_types else 0
        types = list(cfg.layer_types) + ([cfg.mtp_layer_type] if mtp else [])
        self.is_ring = [t == "sliding_attention" and self.ring < capacity for t in types]
        self.wnd = [cfg.window_of(t) for t in types]  # window per layer (None: full)
        self.k = [torch.zeros(batch, G, self.ring if r else capacity, d, dtype=dtype, device=device)
                  for r in self.is_ring]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.windowed_full = any(w is not None and not r for w, r in zip(self.wnd, self.is_ring))
        self.ring_pos_BR = torch.full((batch, max(self.ring, 1)), EMPTY, dtype=torch.long, device=device)
        self.slots_S = torch.arange(capacity, device=device)
        self._zero = torch.zeros((), dtype=dtype, device=device)
        self._ninf = torch.full((), float("-inf"), dtype=dtype, device=device)
        self._empty = True  # the rings hold nothing yet (host-side: a prefill then skips them)
        self._step = None
        self.capture: list | None = None  # when a list: attend appends (layer, k, v) of every step (prefix caching)

    def mark_static(self) -> None:
        """Tell torch.compile that the buffers a step writes in place keep their address from call to
        call (gpt-fast's static cache): a compiled step then treats them as static inputs, and
        cudagraphs (mode="reduce-overhead") keeps the step instead of skipping it for "mutated inputs".
        Called by the compiled steps only (it imports dynamo, a second of start-up)."""
        for t in self.k + self.v + [self.ring_pos_BR]:
            torch._dynamo.mark_static_address(t)

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes of stored keys and values (what `accounting.kv_cache_bytes` predicts)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self) -> None:
        self.ring_pos_BR.fill_(EMPTY)  # full layers need no reset: causality hides unwritten slots
        self._empty = True

    # ------------------------------------------------------------------ rows as slots (continuous batching)
    def rows(self, a: int, b: int, fresh: bool = False) -> "KVCache":
        """A cache over rows a..b-1 that shares this one's storage (slicing the batch axis of a
        contiguous buffer is a contiguous view: `write` and the ring bookkeeping work unchanged).
        fresh: those rows' rings hold nothing yet (a first prefill chunk may skip them)."""
        if not 0 <= a < b <= self.batch:
            raise ValueError(f"KVCache.rows: rows {a}..{b - 1} outside a cache of {self.batch} rows")
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.batch = b - a
        view.k, view.v = [t[a:b] for t in self.k], [t[a:b] for t in self.v]
        view.ring_pos_BR = self.ring_pos_BR[a:b]
        view._empty, view._step, view.capture = fresh, None, None
        return view

    def clear_row(self, b: int) -> None:
        """Forget row b's rings (a new request takes the slot; its full layers need nothing)."""
        self.ring_pos_BR[b].fill_(EMPTY)

    def move_row(self, src: int, dst: int, upto: int) -> None:
        """Copy row src into row dst: full layers' first `upto` slots, the whole rings."""
        for K, V, r in zip(self.k, self.v, self.is_ring):
            n = K.shape[2] if r else min(upto, K.shape[2])
            K[dst, :, :n] = K[src, :, :n]
            V[dst, :, :n] = V[src, :, :n]
        self.ring_pos_BR[dst] = self.ring_pos_BR[src]

    def load_row(self, b: int, kv: list, m: int) -> None:
        """Row b holds positions 0..m-1 from `kv` (per layer (k [G, m, d], v), e.g. from the prefix
        cache): full layers at slot = position, rings the last R positions at position mod R, so the
        ring state is the one a prefill of those m tokens leaves."""
        for i, (K, V, r) in enumerate(zip(self.k, self.v, self.is_ring)):
            k_GMd, v_GMd = kv[i]
            if not r:
                K[b, :, :m], V[b, :, :m] = k_GMd, v_GMd
                continue
            lo = max(0, m - self.ring)
            slots = torch.arange(lo, m, device=K.device) % self.ring
            K[b, :, slots], V[b, :, slots] = k_GMd[:, lo:m], v_GMd[:, lo:m]
        if self.ring:
            lo = max(0, m - self.ring)
            pos = torch.arange(lo, m, device=self.ring_pos_BR.device)
            self.ring_pos_BR[b].fill_(EMPTY)
            self.ring_pos_BR[b, pos % self.ring] = pos

    # ------------------------------------------------------------------ a step
    def begin(self, pos_BT: torch.Tensor, valid_BT: torch.Tensor | None = None, hi: int | None = None,
              ring: bool = True) -> None:
        """Prepare a step writing tokens at positions pos_BT (each row increasing by 1 along T).

        valid_BT marks real tokens (False: right padding of a batched prefill); it matters only on
        the overflow path. hi: an upper bound on every position this step (host-known); full layers
        then attend over the first `hi` slots only (fewer FLOPs, but a shape that changes).
        ring=False: a step of full layers only (the MTP layer), which must not touch the rings."""
        B, T = pos_BT.shape
        if B != self.batch:
            raise ValueError(f"KVCache.begin: pos_BT has {B} rows, the cache was built for {self.batch}")
        if T > self.capacity:
            raise ValueError(f"KVCache.begin: {T} tokens do not fit a cache of capacity {self.capacity}")
        s = _Step()
        s.T = T
        s.hi = self.capacity if hi is None else max(1, min(hi, self.capacity))
        q_BT1 = pos_BT[:, :, None]
        # full layers: slot = position; a query sees every slot at or before its position
        s.full_idx = self._rows(pos_BT, self.capacity)
        dist_BTS = q_BT1 - self.slots_S[None, None, : s.hi]
        s.full_mask = self._additive((dist_BTS >= 0)[:, None])  # [B, 1, T, S]
        # a sliding layer whose window covers the whole capacity lives in a full buffer, plus a window
        s.win_mask = self._additive(((dist_BTS >= 0) & (dist_BTS < self.window))[:, None]) \
            if self.windowed_full else None
        if ring and self.ring and any(self.is_ring):
            R, W = self.ring, self.window
            # right padding of a later prefill chunk could wrap onto live ring slots: keep real tokens only
            padded = valid_BT is not None and not bool(valid_BT.all())
            s.overflow = T > R - W + 1 or padded
            s.fresh = self._empty  # nothing in the rings yet: a prefill attends within its chunk only
            self._empty = False
            if not s.overflow:
                ring_BT = pos_BT % R
                s.ring_idx = self._rows(ring_BT, R)
                self.ring_pos_BR.scatter_(1, ring_BT, pos_BT)
                d_BTR = q_BT1 - self.ring_pos_BR[:, None, :]  # empty slots hold a far-away position: d >= W
                s.ring_mask = self._additive(((d_BTR >= 0) & (d_BTR < W))[:, None])
            else:
                # key positions: the old ring's (unless empty), then the chunk's
                kp_BK = pos_BT if s.fresh else torch.cat([self.ring_pos_BR, pos_BT], dim=1)
                d_BTK = q_BT1 - kp_BK[:, None, :]
                m = (d_BTK >= 0) & (d_BTK < W)
                if not s.fresh:  # old entries at or after the chunk's start are stale (rejected drafts)
                    m = m & torch.cat([self.ring_pos_BR < pos_BT[:, :1], torch.ones_like(pos_BT, dtype=torch.bool)],
                                      1)[:, None]
                s.ring_mask = self._additive(m[:, None])
                # keep per row the last R real positions of the chunk (boolean indexing: prefill only)
                valid = torch.ones_like(pos_BT, dtype=torch.bool) if valid_BT is None else valid_BT
                end_B1 = torch.where(valid, pos_BT + 1, 0).amax(1, keepdim=True)
                keep_BT = valid & (pos_BT >= end_B1 - R)
                s.keep_rows, s.keep_t = keep_BT.nonzero(as_tuple=True)
                s.keep_slots = pos_BT[s.keep_rows, s.keep_t] % R
                self.ring_pos_BR[s.keep_rows, s.keep_slots] = pos_BT[s.keep_rows, s.keep_t]
        self._step = s

    def _rows(self, slot_BT, S):
        """Row indices [B*G*T] into a [B, G, S, d] buffer viewed as [B*G*S, d], in k's (b, g, t) order."""
        B, T = slot_BT.shape
        G = self.cfg.num_key_value_heads
        base_BG1 = (torch.arange(B * G, device=slot_BT.device) * S).view(B, G, 1)
        return (base_BG1 + slot_BT[:, None, :]).reshape(-1)

    def _additive(self, mask_bool):
        """0 where attended, -inf elsewhere, in the attention dtype (SDPA then skips its own conversion)."""
        return torch.where(mask_bool, self._zero, self._ninf)

    def attend(self, layer_idx: int, q_BHTd: torch.Tensor, k_BGTd: torch.Tensor, v_BGTd: torch.Tensor):
        s = self._step
        K, V = self.k[layer_idx], self.v[layer_idx]
        if self.capture is not None:
            self.capture.append((layer_idx, k_BGTd.to(K.dtype), v_BGTd.to(V.dtype)))
        if not self.is_ring[layer_idx]:
            write(K, V, s.full_idx, k_BGTd, v_BGTd)
            if s.hi < K.shape[2]:
                K, V = K[:, :, : s.hi], V[:, :, : s.hi]
            return sdpa(q_BHTd, K, V, s.full_mask if self.wnd[layer_idx] is None else s.win_mask)
        if not s.overflow:
            write(K, V, s.ring_idx, k_BGTd, v_BGTd)
            return sdpa(q_BHTd, K, V, s.ring_mask)
        k, v = k_BGTd.to(K.dtype), v_BGTd.to(V.dtype)
        o = sdpa(q_BHTd, k, v, s.ring_mask) if s.fresh else \
            sdpa(q_BHTd, torch.cat([K, k], 2), torch.cat([V, v], 2), s.ring_mask)
        K[s.keep_rows, :, s.keep_slots] = k[s.keep_rows, :, s.keep_t]
        V[s.keep_rows, :, s.keep_slots] = v[s.keep_rows, :, s.keep_t]
        return o


class _Step:
    """What `begin` computed once for every layer of one forward pass."""

    __slots__ = ("T", "hi", "full_idx", "full_mask", "win_mask", "overflow", "fresh", "ring_idx", "ring_mask",
                 "keep_rows", "keep_t", "keep_slots")


def write(K_BGSd, V_BGSd, rows, k_BGTd, v_BGTd) -> None:
    """Store k/v of T tokens at per-row slots, in place, no host sync: one index_copy_ per tensor over
    the buffer viewed as [B*G*S, d] (`KVCache._rows`). Not scatter_: on a CPU a bf16 scatter_ costs
    ~30 us for one token's 2 x 64 values, index_copy_ ~2.4 us (fp32 scatter_ ~1.6 us).
    Traced into a compiled step it is one index_put_ on the 4-D buffer instead: inductor updates that
    in place, where an in-place op on a view of a buffer written twice in one graph (the MTP layer's,
    in a speculative step) made it clone the whole buffer first."""
    if torch.compiler.is_compiling():
        B, G, S, _ = K_BGSd.shape
        r = rows.view(B, G, -1)
        idx = (r // (G * S), (r // S) % G, r % S)
        K_BGSd.index_put_(idx, k_BGTd.to(K_BGSd.dtype))
        V_BGSd.index_put_(idx, v_BGTd.to(V_BGSd.dtype))
        return
    d = K_BGSd.shape[-1]
    K_BGSd.view(-1, d).index_copy_(0, rows, k_BGTd.reshape(-1, d).to(K_BGSd.dtype))
    V_BGSd.view(-1, d).index_copy_(0, rows, v_BGTd.reshape(-1, d).to(V_BGSd.dtype))


def sdpa(q_BHTd, k_BGSd, v_BGSd, mask_B1TS):
    """Attention of H query heads over G kv heads (GQA) with an additive mask (0 or -inf)."""
    B, H, T, _ = q_BHTd.shape
    if T <= 8 and q_BHTd.device.type == "cpu" and (
            torch.compiler.is_compiling() or q_BHTd.dtype != torch.float32 or (B >= 12 and H > k_BGSd.shape[1])):
        # few queries on a CPU: traced (see _few_queries); eager in bf16/fp16, where the flash kernel
        # costs ~10x the two matmuls (one query, 32 rows x 256 keys: 4.9 ms vs 0.47 ms); eager fp32 for
        # a batch of GQA rows, where the matmuls read each kv head once for its query heads (32 rows,
        # 4 heads over 2, 256 keys: 0.75 ms vs 0.52 ms; at one row the flash kernel wins, 36 vs 63 us)
        return _few_queries(q_BHTd, k_BGSd, v_BGSd, mask_B1TS)
    return F.scaled_dot_product_attention(q_BHTd, k_BGSd.to(q_BHTd.dtype), v_BGSd.to(q_BHTd.dtype),
                                          attn_mask=mask_B1TS, enable_gqa=q_BHTd.shape[1] != k_BGSd.shape[1])


def _few_queries(q_BHTd, k_BGSd, v_BGSd, mask_B1TS):
    """SDPA written out for a decode or verify step (T <= 8 queries) traced into a compiled CPU step:
    inductor fuses scores, mask, softmax and the weighted sum into a few loops over the cache, where
    the CPU flash-attention kernel it would otherwise call costs ~60 us a layer for one query.
    The r = H/G query heads that share a kv head are stacked along the query axis."""
    B, H, T, d = q_BHTd.shape
    G = k_BGSd.shape[1]
    q_BGRd = q_BHTd.reshape(B, G, (H // G) * T, d)  # head h -> kv head h // (H/G), as enable_gqa
    k, v = k_BGSd.to(q_BHTd.dtype), v_BGSd.to(q_BHTd.dtype)
    s_BGRS = torch.matmul(q_BGRd, k.transpose(-1, -2)) * d ** -0.5
    s_BGRS = (s_BGRS.view(B, G, H // G, T, -1) + mask_B1TS[:, :, None]).view(B, G, (H // G) * T, -1)
    p_BGRS = torch.softmax(s_BGRS.float(), -1).to(q_BHTd.dtype)
    return torch.matmul(p_BGRS, v).view(B, H, T, d)
