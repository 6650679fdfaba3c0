"""`LongContextLoader`: batches for the long-context stage (Mellum 2 §4: 8K -> 128K with
layer-selective YaRN) — long packed rows where repository-level samples carry the long-range signal.

Each row of `seq_len` tokens is filled with, drawn one after another:
  - with probability `repo_fraction`, a repository-level sample: every code file of one package
    (`ShardStore.repo_sample`: `<reponame>` package, then `<filename>` path + source per file,
    `<|endoftext|>`); with probability `repo_fim_rate` it is FIM-transformed at repository level: both
    cuts fall inside one randomly chosen file, so the middle is one file's span and the prefix and
    suffix carry the rest of the repository (PSM/SPM 50/50, fim.py);
  - otherwise a single document of the phase-3 mixture (23/59/18 web/code/math), between
    `<|endoftext|>` tokens.
The last item of a row is cut to fit (long rows are the point, so no padding); `position_ids` restart
at every item and `labels` are -100 at each item's first token, as in `Loader`.

Batches are a pure function of (seed, rank, step): the state is the step counter, so resume is exact
by construction and every rank draws distinct rows. Same interface as `Loader` (`phase`,
`phase_boundaries`, `tokens_seen`, `state_dict`); the stage is one phase, decayed by the trainer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .fim import PSM, SPM, FimIds, apply_fim, draw_cuts
from .shards import ShardStore

PHASE3_MIX = {"web": 0.23, "code": 0.59, "math": 0.18}


class LongContextLoader:
    def __init__(self, data_dir: str | Path, batch_size: int, seq_len: int, total_tokens: int, tokenizer=None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, repo_fraction: float = 0.5,
                 repo_fim_rate: float = 0.5, mixture: dict[str, float] | None = None, min_repo_tokens: int = 256):
        for name, v, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 16), ("total_tokens", total_tokens, 1),
                            ("world_size", world_size, 1)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"LongContextLoader: {name} must be an int >= {lo}, got {v!r}")
        for name, v in (("repo_fraction", repo_fraction), ("repo_fim_rate", repo_fim_rate)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"LongContextLoader: {name} must be in [0, 1], got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"LongContextLoader: rank must be in [0, {world_size}), got {rank}")
        self.store = ShardStore(data_dir)
        if tokenizer is None:
            tokenizer = Tokenizer.load(Path(data_dir) / "tokenizer")
        self.tok = tokenizer
        self.batch_size, self.seq_len, self.total_tokens = int(batch_size), int(seq_len), int(total_tokens)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.repo_fraction, self.repo_fim_rate = float(repo_fraction), float(repo_fim_rate)
        mix = {d: w for d, w in (mixture or PHASE3_MIX).items() if self.store.n_docs(d) > 0}
        if not mix:
            raise ValueError(f"{data_dir}: no documents in any of the mixture's domains")
        self.domains = sorted(mix)
        p = np.array([mix[d] for d in self.domains], dtype=np.float64)
        self.domain_p = p / p.sum()
        groups = self.store.groups("code") if self.store.n_docs("code") else {}
        lens = self.store.doc_lens("code") if groups else None
        # packages with enough code to be worth a repository sample, in a stable order
        self.groups = sorted(g for g, idx in groups.items() if lens[idx].sum() >= min_repo_tokens)
        if not self.groups:
            self.repo_fraction = 0.0
        self.fim = FimIds.from_special(self.store.special_ids)
        ids = self.store.special_ids
        self.eot_id, self.file_sep_id = int(ids["eot"]), int(ids["file_sep"])
        self.phase_boundaries = [0, 0, self.total_tokens]
        self.step = 0
        self._repo_cache: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ interface of Loader
    @property
    def batch_tokens(self) -> int:
        return self.batch_size * self.seq_len * self.world_size

    @property
    def tokens_seen(self) -> int:
        return self.step * self.batch_tokens

    @property
    def phase(self) -> int:
        return 2

    def __len__(self) -> int:
        return max(0, -(-(self.total_tokens - self.tokens_seen) // self.batch_tokens))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.tokens_seen >= self.total_tokens:
            raise StopIteration
        rng = np.random.default_rng([self.seed, self.rank, self.step, 0x10C])
        rows = [self._row(rng) for _ in range(self.batch_size)]
        self.step += 1
        return {k: torch.from_numpy(np.stack([r[i] for r in rows])) for i, k in
                enumerate(("input_ids", "labels", "position_ids"))}

    def state_dict(self) -> dict:
        return {"kind": "long-context", "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size, "fingerprint": self.store.fingerprint()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != "long-context":
            raise ValueError(f"LongContextLoader: state is of kind {sd.get('kind')!r}, expected 'long-context'")
        for k in ("seed", "seq_len", "batch_size", "world_size"):
            if sd[k] != getattr(self, k):
                raise ValueError(f"LongContextLoader: state has {k}={sd[k]}, this loader {getattr(self, k)}")
        if sd["fingerprint"] != self.store.fingerprint():
            raise ValueError("LongContextLoader: the state was saved for a different prepared dataset")
        self.step = int(sd["step"])

    # ------------------------------------------------------------------ rows
    def _row(self, rng: np.random.Generator):
        T = self.seq_len
        ids = np.empty(T, dtype=np.int64)
        labels = np.empty(T, dtype=np.int64)
        pos = np.empty(T, dtype=np.int64)
        n = 0
        while n < T:
            item = self._item(rng)[: T - n]
            k = len(item)
            ids[n:n + k] = item
            labels[n:n + k] = item
            labels[n] = -100  # nothing of this item precedes its first token
            pos[n:n + k] = np.arange(k)
            n += k
        return ids, labels, pos

    def _item(self, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.repo_fraction:
            sample = self._repo(self.groups[rng.integers(len(self.groups))])
            return self._repo_fim(sample, rng) if rng.random() < self.repo_fim_rate else sample
        d = self.domains[rng.choice(len(self.domains), p=self.domain_p)]
        doc = self.store.doc(d, int(rng.integers(self.store.n_docs(d))))
        return np.concatenate([[self.eot_id], doc.astype(np.int64), [self.eot_id]])

    def _repo(self, group: str) -> np.ndarray:
        if group not in self._repo_cache:
            if len(self._repo_cache) > 256:
                self._repo_cache.clear()
            self._repo_cache[group] = self.store.repo_sample(group, self.tok)
        return self._repo_cache[group]

    def _repo_fim(self, sample: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Repository-level FIM: the middle lies inside one file, the rest of the repo is context."""
        seps = np.flatnonzero(sample == self.file_sep_id)
        if len(seps) == 0:
            return sample
        f = int(rng.integers(len(seps)))
        lo = int(seps[f]) + 1
        hi = int(seps[f + 1]) if f + 1 < len(seps) else len(sample) - 1  # before the final <|endoftext|>
        i, j = draw_cuts(hi - lo, rng)
        mode = PSM if rng.random() < 0.5 else SPM
        return apply_fim(sample, lo + i, lo + j, mode, self.fim)
