"""Automatic prefix caching: the KV of prompt blocks that earlier requests computed, reused by a request
whose prompt starts with the same tokens (a chat's history, the file an IDE sends at every keystroke).

As vLLM's automatic prefix caching: a prompt is cut into blocks of `block` tokens; block j is named
by a hash chained over every token up to its end (hash(parent, tokens)), so one name means one whole
prefix. A lookup walks the chain from block 0 and stops at the first block not cached. Unlike vLLM
the engine's KV pool is not paged: a hit copies the cached blocks into the request's slot
(`KVCache.load_row`), which costs a memory copy instead of a forward pass over those tokens.

What a block holds: the k and v of its tokens in every layer, the sliding-window layers and the MTP
layer included. A sliding layer's ring at the end of a cached prefix of m tokens is exactly its last
R positions' k/v (a key depends only on the tokens up to it, not on what the ring held), so the ring
state at the prefix end is rebuilt from the blocks. Two positions are not reusable as is, and the
engine recomputes them: the last token of a prompt (its logits sample the first new token), and,
for the MTP layer, the last position of the hit (its k/v depends on the next token, which the hash
does not cover). Only blocks that end before a prompt's last token are stored, so no stored MTP
entry saw a generated token.

Bounded memory: at most `max_blocks` blocks; least recently used first out. A hit touches its
blocks from the last to the first, so a chain's deepest blocks go before its root (a root evicted
first would strand its descendants). Entries are tied to the weights and the cache layout: the
engine clears the cache when either changes.

Legend: G kv heads, d head dim, b block tokens.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class Block:
    __slots__ = ("tokens", "parent", "kv")

    def __init__(self, tokens: tuple, parent, kv: list):
        self.tokens, self.parent, self.kv = tokens, parent, kv  # kv [layers, 2, G, b, d]: kv[i] = (k, v) of layer i


class PrefixCache:
    def __init__(self, block: int, max_blocks: int):
        if block < 1 or max_blocks < 0:
            raise ValueError(f"PrefixCache: block must be >= 1 and max_blocks >= 0, got {block}, {max_blocks}")
        self.block, self.max_blocks = block, max_blocks
        self.blocks: OrderedDict = OrderedDict()  # chained hash -> Block, least recently used first
        self.queries = self.hit_tokens = self.query_tokens = 0
        self._nbytes = 0  # k/v bytes of the cached blocks, kept as they come and go

    def __len__(self) -> int:
        return len(self.blocks)

    def clear(self) -> None:
        self.blocks.clear()
        self._nbytes = 0

    def _names(self, prompt: list[int], n: int):
        h, out = None, []
        for j in range(n):
            toks = tuple(prompt[j * self.block:(j + 1) * self.block])
            h = hash((h, toks))
            out.append((h, toks))
        return out

    def lookup(self, prompt: list[int], max_blocks: int) -> list[Block]:
        """The longest chain of cached blocks at the start of `prompt` (at most max_blocks)."""
        self.queries += 1
        self.query_tokens += len(prompt)
        if not self.max_blocks:
            return []
        hit = []
        parent = None
        for h, toks in self._names(prompt, max_blocks):
            b = self.blocks.get(h)
            if b is None or b.tokens != toks or b.parent != parent:  # tokens checked: no hash collision
                break
            hit.append((h, b))
            parent = h
        for h, _ in reversed(hit):
            self.blocks.move_to_end(h)
        self.hit_tokens += len(hit) * self.block
        return [b for _, b in hit]

    def insert(self, prompt: list[int], first: int, kv_of_block) -> None:
        """Store blocks first..n-1 of the prompt, n = the blocks that end before its last token;
        kv_of_block(j) gives block j's k/v, [layers, 2, G, b, d]. Blocks already cached are kept as they are."""
        n = (len(prompt) - 1) // self.block
        if not self.max_blocks or n <= first:
            return
        names = self._names(prompt, n)
        for j in range(n - 1, -1, -1):  # deepest first: the root ends up most recently used
            h, toks = names[j]
            if h in self.blocks:
                self.blocks.move_to_end(h)
            elif j >= first:  # (a block of the hit evicted since the lookup: its k/v is not at hand)
                b = self.blocks[h] = Block(toks, names[j - 1][0] if j else None, kv_of_block(j))
                self._nbytes += _nbytes(b)
        while len(self.blocks) > self.max_blocks:
            self._nbytes -= _nbytes(self.blocks.popitem(last=False)[1])

    # ------------------------------------------------------------------ the engine's side
    def load(self, pool, r, mtp: bool) -> int:
        """Copy the cached KV of request r's leading prompt blocks into its pool row; start its prefill
        after them (at the hit's last position when the MTP layer needs it recomputed). Returns the
        prompt tokens not to compute. From then on r's prefill k/v are captured (`keep`)."""
        if not self.max_blocks:
            return 0
        blocks = self.lookup(r.prompt, (len(r.prompt) - 1) // self.block)
        r.hit_blocks, r.captured = len(blocks), {}
        if not blocks:
            return 0
        m = len(blocks) * self.block
        kv = [(torch.cat([b.kv[i][0] for b in blocks], 1), torch.cat([b.kv[i][1] for b in blocks], 1))
              for i in range(len(blocks[0].kv))]
        pool.load_row(r.slot, kv, m)
        r.done_prompt = m - 1 if mtp else m
        r.res.stats.cached_tokens += r.done_prompt
        return r.done_prompt

    @staticmethod
    def keep(rows, takes, capture) -> None:
        """Keep each prefilling row's k/v of this chunk (capture: (layer, k_BGTd, v_BGTd) per attention
        call; row i's real tokens are its first takes[i])."""
        for i, (r, t) in enumerate(zip(rows, takes)):
            if r.captured is None:
                continue
            for layer, k_BGTd, v_BGTd in capture:
                r.captured.setdefault(layer, []).append((k_BGTd[i, :, :t], v_BGTd[i, :, :t]))

    def store(self, r) -> None:
        """r's prompt is prefilled: store its new whole blocks."""
        if r.captured is None:
            return
        cap, r.captured = r.captured, None
        # every layer's k and v side by side, [layers, 2, G, n, d]: then a block is one copy, not 2 x layers
        kv = torch.stack([torch.stack([torch.cat([k for k, _ in cap[i]], 1), torch.cat([v for _, v in cap[i]], 1)])
                          for i in sorted(cap)])
        s = len(r.prompt) - kv.shape[3]  # first position computed (after a hit)
        bs = self.block

        def block(j):
            return kv[:, :, :, j * bs - s:(j + 1) * bs - s].clone()

        self.insert(r.prompt, r.hit_blocks, block)

    def nbytes(self) -> int:
        """Bytes of k/v the cached blocks hold (kept up to date, O(1): the engine reports it every step)."""
        return self._nbytes


def _nbytes(b: Block) -> int:
    return b.kv.numel() * b.kv.element_size()
