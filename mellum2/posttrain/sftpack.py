"""SFT batches: examples packed best-fit into rows of `seq_len`, served to the pre-training `Trainer`.

    loader = SFTLoader(examples, seq_len=1024, batch_size=8, epochs=2, pad_id=tok.pad_id, seed=0)
    for batch in loader: ...   # {"input_ids", "labels", "position_ids"}: int64 [B, T]

Packing (Mellum 2 packs SFT samples with best fit, like its pre-training data): each epoch visits
the examples in a fresh seeded order through a best-fit buffer (mellum2.data.packing.pack_best_fit:
a row takes the largest waiting example that still fits, then the next, ...), so rows are dense and
differ between epochs. An example longer than `seq_len` is never cut (a truncated reply would teach
the model to stop mid-answer or lose the `<|im_end|>` it must learn to write): it is dropped, and
`dropped` counts it. The rest of a row is padding: `pad_id` tokens, labels -100, their own document.

Documents in one row do not attend to each other: `position_ids` restart at 0 at every example,
and the model's attention (mellum2.model.layers, the transformers rule: a new document starts where
position ids do not go up by one) masks across that boundary; the MTP head gets the same positions.
The first two labels of every example are -100 (they are prompt tokens anyway): position t's
next-token and MTP (t + 2) targets then never lie in another document.

Rows are spread over W ranks as the pre-training loaders do: micro-batch i of the run is rows
[i B W, (i + 1) B W) of the epochs' rows one after another; rank k takes the k-th B of them. The
run's last micro-batches are filled up with all-padding rows (no labels) so every epoch is seen
whole and the step count is exact. Resuming needs only the micro-batch index (`state_dict`), checked
against a fingerprint of the examples and settings.
"""
from __future__ import annotations

import hashlib
import random
from typing import Sequence

import torch

from mellum2.data.packing import pack_best_fit

IGNORE = -100
BUFFER = 1024  # examples waiting in the best-fit buffer: large enough that rows come out nearly full


def fits(examples: Sequence[tuple[list[int], list[int]]], seq_len: int) -> tuple[list[int], list[int]]:
    """(indices of examples that fit in a row and carry a label, indices of those longer than seq_len)."""
    keep, long = [], []
    for i, (ids, labels) in enumerate(examples):
        if len(ids) > seq_len:
            long.append(i)
        elif any(x != IGNORE for x in labels[2:]):
            keep.append(i)
    return keep, long


def pack_epoch(lengths: Sequence[int], seq_len: int, seed: int, epoch: int) -> list[list[int]]:
    """Rows (lists of indices into `lengths`) of one epoch: a seeded shuffle through best fit, rows shuffled.
    Every length must be <= seq_len."""
    order = list(range(len(lengths)))
    rng = random.Random(f"sft-pack:{seed}:{epoch}")
    rng.shuffle(order)
    res = pack_best_fit([lengths[i] for i in order], seq_len, buffer_size=BUFFER)
    if res.n_split:
        raise ValueError(f"pack_epoch: {res.n_split} examples longer than seq_len {seq_len} (drop them first)")
    rows = [[order[doc] for doc, _, _ in row] for row in res.rows]
    rng.shuffle(rows)  # best fit emits rows of long examples first
    return rows


def build_row(examples, idx: Sequence[int], seq_len: int, pad_id: int) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, position_ids) of one row holding examples `idx`, padded to seq_len."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for i in idx:
        x, y = examples[i]
        ids += x
        labels += [IGNORE, IGNORE] + list(y[2:])  # no target predicted across the document boundary
        pos += range(len(x))
    pad = seq_len - len(ids)
    if pad < 0:
        raise ValueError(f"build_row: examples {list(idx)} hold {len(ids)} tokens, more than seq_len {seq_len}")
    return ids + [pad_id] * pad, labels + [IGNORE] * pad, pos + list(range(pad))


class SFTLoader:
    """Packed SFT micro-batches over `epochs` passes (see the module docstring)."""

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], *, seq_len: int, batch_size: int,
                 epochs: int = 1, pad_id: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1):
        if seq_len < 2 or batch_size < 1 or epochs < 1 or grad_accum < 1:
            raise ValueError(f"SFTLoader: need seq_len >= 2, batch_size, epochs, grad_accum >= 1; got "
                             f"{seq_len}, {batch_size}, {epochs}, {grad_accum}")
        self.seq_len, self.batch_size, self.epochs, self.pad_id = seq_len, batch_size, epochs, pad_id
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum
        keep, long = fits(examples, seq_len)
        self.examples = [examples[i] for i in keep]
        self.dropped = len(long)  # longer than seq_len: never truncated
        self.unlabelled = len(examples) - len(keep) - len(long)  # nothing to learn from (no label)
        if not self.examples:
            raise ValueError(f"SFTLoader: no example fits in --seq-len {seq_len} "
                             f"({len(long)} longer, {self.unlabelled} without labels)")
        lengths = [len(x) for x, _ in self.examples]
        self.rows: list[list[int]] = []
        self.epoch_rows: list[int] = []  # rows in each epoch
        for e in range(epochs):
            rows = pack_epoch(lengths, seq_len, seed, e)
            self.rows += rows
            self.epoch_rows.append(len(rows))
        per_mb = batch_size * world_size
        self.micro_batches = -(-len(self.rows) // (per_mb * grad_accum)) * grad_accum
        self.steps = self.micro_batches // grad_accum
        self.tokens_real = sum(lengths) * epochs
        self.fingerprint = self._fingerprint()
        self.batch_index = 0
        self.phase = 0  # the epoch of the micro-batch yielded last (the trainer logs it as `phase`)

    def _fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=12)
        h.update(repr((self.seq_len, self.batch_size, self.epochs, self.pad_id, self.seed, self.grad_accum,
                       self.world_size)).encode())
        for x, y in self.examples:
            h.update(repr((x, y)).encode())
        return h.hexdigest()

    def epoch_start_steps(self) -> list[int]:
        """Finished optimiser steps when epochs 2.. start, then the number of steps (the plot's boundaries)."""
        out, rows = [], 0
        per_step = self.batch_size * self.world_size * self.grad_accum
        for n in self.epoch_rows[:-1]:
            rows += n
            out.append(rows // per_step)
        return out + [self.steps]

    @property
    def pad_fraction(self) -> float:
        return 1 - self.tokens_real / max(len(self.rows) * self.seq_len, 1)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len * self.world_size

    @property
    def tokens_seen(self) -> int:
        return self.batch_index * self.tokens_per_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch_index >= self.micro_batches:
            raise StopIteration
        first = self.batch_index * self.batch_size * self.world_size + self.rank * self.batch_size
        rows, r = [], first
        for r in range(first, first + self.batch_size):
            idx = self.rows[r] if r < len(self.rows) else []
            rows.append(build_row(self.examples, idx, self.seq_len, self.pad_id))
        self.phase = self._epoch_of(min(first, len(self.rows) - 1))
        self.batch_index += 1
        ids, lab, pos = (torch.tensor([row[k] for row in rows], dtype=torch.long) for k in range(3))
        return {"input_ids": ids, "labels": lab, "position_ids": pos}

    def _epoch_of(self, row: int) -> int:
        for e, n in enumerate(self.epoch_rows):
            if row < n:
                return e
            row -= n
        return len(self.epoch_rows) - 1

    def state_dict(self) -> dict:
        return {"batch_index": self.batch_index, "phase": self.phase, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError("SFTLoader state: the examples or packing settings differ from the run that saved it")
        self.batch_index, self.phase = int(state["batch_index"]), int(state["phase"])
