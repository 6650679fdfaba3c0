"""Perplexity by position on long sequences: does the model use (and not break on) long context?

Each sequence is one forward pass at full length (blocked attention keeps memory linear); the
per-token negative log-likelihoods are averaged in position buckets [0, b1), [b1, b2), ... so a
model that extrapolates well keeps its loss falling (or flat) in the buckets past its training length.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def buckets_for(length: int, first: int = 256) -> list[int]:
    """Bucket edges 0, first, 2*first, 4*first, ... up to length."""
    edges, b = [0], first
    while b < length:
        edges.append(b)
        b *= 2
    return edges + [length]


@torch.no_grad()
def nll_by_position(model, seqs, chunk: int = 1024) -> torch.Tensor:
    """[N, T-1] NLL of token t+1 given tokens 0..t, for equal-length sequences (a list of id lists)."""
    out = []
    for ids in seqs:
        x = torch.tensor([ids], device=model.lm_head.weight.device)
        h, _ = model.trunk(x)
        nll = []
        for s in range(0, x.shape[1] - 1, chunk):  # logits in chunks: V x T fp32 would be large
            e = min(x.shape[1] - 1, s + chunk)
            nll.append(F.cross_entropy(model.head(h[:, s:e])[0], x[0, s + 1:e + 1], reduction="none"))
        out.append(torch.cat(nll))
    return torch.stack(out)


def bucketed(nll_NT: torch.Tensor, edges: list[int]) -> list[dict]:
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        m = nll_NT[:, a:b].mean().item()
        rows.append({"from": a, "to": b, "nll": m, "ppl": math.exp(m)})
    return rows
