"""Where the trainer's batches come from: the real curriculum loader (mellum2.data.loader.Loader) or
`SyntheticLoader`, a documented test utility with the same interface.

The interface the trainer relies on (mellum2.data.loader.Loader's):
  Loader(data_dir, batch_size, seq_len, total_tokens, rank=0, world_size=1, seed=0, phases=None,
         fim_rates=None); iterating yields dicts of int64 [B, T] tensors `input_ids`, `labels`
  (-100 = no loss) and `position_ids` (restarting at 0 where a packed document starts);
  `phase` (0..2), `phase_boundaries` (global token counts where phases 2 and 3 start, and the end),
  `tokens_seen`, `state_dict()` / `load_state_dict()` resuming exactly.

SyntheticLoader draws packed documents from a fixed random Markov chain (each token has four likely
successors, so the loss can fall from ln V to about 1 nat), masks the first label of every document,
and changes the chain's sharpness per phase. Row r of global batch i is a pure function of
(seed, i, r): rank k of W gets rows k*B .. (k+1)*B-1, so W processes with batch B see exactly the
batch one process sees with batch W*B (what the multi-process test needs), and resuming needs only
the batch index.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from mellum2.data import ensure_default_data
from mellum2.data.curriculum import phase_boundaries, resolve_phases
from mellum2.data.loader import Loader
from mellum2.data.longctx import LongContextLoader
from mellum2.errors import MellumError

from .errors import TrainError

_SUCC_P = ((0.55, 0.25, 0.12, 0.08), (0.7, 0.2, 0.07, 0.03), (0.85, 0.1, 0.04, 0.01))  # per phase


class SyntheticLoader:
    """Test utility following the Loader interface; see the module docstring."""

    def __init__(self, data_dir=None, batch_size: int = 8, seq_len: int = 128, total_tokens: int = 1 << 20,
                 rank: int = 0, world_size: int = 1, seed: int = 0, phases=None, fim_rates=None,
                 vocab_size: int = 256):
        if batch_size < 1 or seq_len < 2 or vocab_size < 8:
            raise ValueError(f"SyntheticLoader: need batch_size >= 1, seq_len >= 2, vocab_size >= 8; "
                             f"got {batch_size}, {seq_len}, {vocab_size}")
        self.batch_size, self.seq_len, self.total_tokens = batch_size, seq_len, total_tokens
        self.rank, self.world_size, self.seed, self.vocab_size = rank, world_size, seed, vocab_size
        phases = resolve_phases(phases)  # the curriculum's phases (data/curriculum.py), three of them
        if len(phases) != 3:
            raise ValueError(f"SyntheticLoader: expected three phases, got {len(phases)}")
        self.phase_boundaries = phase_boundaries(total_tokens, phases)
        rng = random.Random(1234)  # the "language" is fixed; the seed only picks the samples
        self.succ = [[rng.randrange(4, vocab_size) for _ in range(4)] for _ in range(vocab_size)]
        self.batch_index = 0
        self.phase = 0  # phase of the batch yielded last (as the real Loader reports it)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len * self.world_size

    @property
    def tokens_seen(self) -> int:
        return self.batch_index * self.tokens_per_batch

    def _row(self, i: int, row: int, phase: int):
        rng = random.Random(hash((self.seed, i, row)) & 0xFFFFFFFF)
        T, p = self.seq_len, _SUCC_P[phase]
        ids, pos, lab = [], [], []
        while len(ids) < T:
            n = min(T - len(ids), rng.randint(max(2, T // 4), T))
            tok = rng.randrange(4, self.vocab_size)
            for j in range(n):
                if j:
                    tok = self.succ[tok][rng.choices(range(4), weights=p)[0]]
                ids.append(tok)
                pos.append(j)
                lab.append(-100 if j == 0 else tok)
        return ids, pos, lab

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.tokens_seen >= self.total_tokens:
            raise StopIteration
        self.phase = phase = sum(self.tokens_seen >= b for b in self.phase_boundaries[:2])
        rows = [self._row(self.batch_index, self.rank * self.batch_size + b, phase) for b in range(self.batch_size)]
        self.batch_index += 1
        ids, pos, lab = (torch.tensor([r[k] for r in rows], dtype=torch.long) for k in range(3))
        return {"input_ids": ids, "labels": lab, "position_ids": pos}

    def state_dict(self) -> dict:
        return {"batch_index": self.batch_index, "phase": self.phase, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "world_size", "batch_size", "seq_len"):
            if state.get(k) != getattr(self, k):
                raise ValueError(f"SyntheticLoader state: {k} is {state.get(k)!r}, this loader has {getattr(self, k)!r}")
        self.batch_index, self.phase = int(state["batch_index"]), int(state["phase"])


def make_loader(data: str | None, *, vocab_size: int, batch_size: int, seq_len: int, total_tokens: int,
                rank: int, world_size: int, seed: int, long_context: dict | None = None, phases=None):
    """`data`: 'synthetic', a prepared data directory, or None for the embedded default corpus.
    `phases`: the curriculum (resolve_phases' forms; None: the report's three phases).
    `long_context`: options of `LongContextLoader` (the long-context stage) instead of the curriculum.
    Returns (loader, data_dir or None)."""
    common = dict(batch_size=batch_size, seq_len=seq_len, total_tokens=total_tokens, rank=rank,
                  world_size=world_size, seed=seed)
    if data == "synthetic":
        return SyntheticLoader(None, vocab_size=vocab_size, phases=phases, **common), None
    if data is None:
        data_dir = Path(ensure_default_data(progress=rank == 0))
    else:
        data_dir = Path(data)
        if not data_dir.is_dir():
            raise TrainError(f"--data {data}: no such directory (expected a prepared data "
                             f"directory from `mellum2 data`, or 'synthetic')")
    if long_context is not None:
        try:
            loader = LongContextLoader(data_dir, **common, **long_context)
        except MellumError:
            raise
        except ValueError as e:
            raise TrainError(f"long-context data: {e}") from None
    else:  # a missing index, a truncated or corrupt shard: ShardError, naming the file
        loader = Loader(data_dir, phases=phases, **common)
    n = getattr(getattr(loader, "store", None), "vocab_size", None)
    if n is not None and n > vocab_size:
        raise TrainError(f"{data_dir}: its tokenizer has {n} tokens but the model's vocab_size is {vocab_size} "
                         f"(choose a preset/config with vocab_size >= {n})")
    return loader, data_dir
