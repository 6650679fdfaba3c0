"""`Loader`: packed training batches from prepared shards, following the three-phase curriculum.

    loader = Loader(data_dir, batch_size=8, seq_len=512, total_tokens=50_000_000)
    for batch in loader:              # stops once the token budget is reached
        out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])

Each batch is a dict of int64 tensors [B, T]:
  input_ids     packed documents, `<fim_pad>` (id 4) in any padding at the end of a row
  labels        input_ids, with -100 at padding and at the first token of every piece (nothing in
                the same document precedes it); the model shifts labels itself, like transformers
  position_ids  0, 1, 2, ... restarting at every piece, so the model can mask attention per document

What happens per document, all at load time (so the trainer may change `seq_len` between stages):
  1. the phase's `DeficitMixer` picks a domain, that domain's `DomainStream` a document (curriculum.py);
  2. the document is cut into pieces of at most seq_len - 5 tokens; a piece gets `<|endoftext|>` (the
     bos, id 0) in front if it starts the document and `<|endoftext|>` after it if it ends it;
  3. with the phase's FIM rate (phase 3: code only) the piece is FIM-transformed, SPM with the phase's
     `spm_rate` (the report's 50/50 by default) and PSM otherwise,
     cut at two uniform token positions (fim.py; 3 sentinel tokens, hence the 5 above). A FIM piece
     always ends with `<|endoftext|>`, also when the document goes on: the token after the middle
     is what teaches the model to stop filling (Bavarian et al. end every FIM example so), and an
     inference prompt ends its middle there;
  4. pieces wait in a best-fit buffer (packing.py) that fills each row.

`tokens_seen` counts B x T x world_size per batch (all ranks, padding included) and decides the phase;
at a phase change the buffer is emptied so every emitted token follows its phase's mixture and FIM rate.
State is a JSON-serialisable dict: stream positions, RNG state, phase counters and the buffered pieces
as (domain, doc, start, length, first, last, fim mode, cut i, cut j) tuples, so `load_state_dict`
reproduces the uninterrupted run exactly. Changing `seq_len` on restore discards the buffer.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .curriculum import MAX_REPEATS, DeficitMixer, DomainStream, phase_at, phase_boundaries, resolve_phases
from .fim import OVERHEAD, PSM, SPM, FimIds, apply_fim, draw_cuts
from .packing import BestFitBuffer
from .shards import ShardStore
from .sources import DOMAINS

STATE_VERSION = 2  # 2: a FIM piece always ends with <|endoftext|>


def _closes(last: int, mode: int) -> int:
    """1 when a piece ends with `<|endoftext|>`: it ends its document, or it is a FIM piece (whose
    middle always ends there, see the module docstring), else 0."""
    return int(bool(last) or mode > 0)


class Loader:
    def __init__(self, data_dir: str | Path, batch_size: int, seq_len: int, total_tokens: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, phases=None, fim_rates=None,
                 max_repeats: int = MAX_REPEATS, buffer_size: int = 64):
        for name, v, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 16), ("total_tokens", total_tokens, 1),
                            ("world_size", world_size, 1), ("max_repeats", max_repeats, 1), ("buffer_size", buffer_size, 1)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"Loader: {name} must be an int >= {lo}, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"Loader: rank must be in [0, world_size={world_size}), got {rank}")
        self.store = ShardStore(data_dir)
        self.batch_size, self.seq_len, self.total_tokens = int(batch_size), int(seq_len), int(total_tokens)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.max_repeats, self.buffer_size = int(max_repeats), int(buffer_size)
        self.phases = resolve_phases(phases, fim_rates)
        self.phase_boundaries = phase_boundaries(self.total_tokens, self.phases)
        self.domains = [d for d in DOMAINS if self.store.n_docs(d) > 0]
        if not self.domains:
            raise ValueError(f"Loader: {data_dir} holds no documents")
        for p in self.phases:
            if not p.weights(self.domains):
                raise ValueError(f"Loader: {p.name}'s mixture {p.mixture} names no domain present in "
                                 f"{data_dir} (it has {self.domains})")
            missing = [d for d, w in p.mixture.items() if w > 0 and d not in self.domains]
            if missing:
                warnings.warn(f"Loader: {data_dir} has no {missing} documents; {p.name}'s mixture is "
                              f"renormalised over {self.domains}", stacklevel=2)
        ids = self.store.special_ids
        self.fim_ids = FimIds.from_special(ids)
        self.bos_id, self.eot_id, self.pad_id = int(ids["eot"]), int(ids["eot"]), int(ids["fim_pad"])
        self.streams = {d: DomainStream(self.store.n_docs(d), self.seed, DOMAINS.index(d), self.rank,
                                        self.world_size, self.max_repeats) for d in self.domains}
        self.rng = np.random.Generator(np.random.PCG64([self.seed, self.rank, 0x4D32]))
        self.buffer = BestFitBuffer()
        self.tokens_seen = 0
        self.pad_tokens = 0
        self.emitted = [{d: 0 for d in self.domains} for _ in self.phases]  # content tokens per phase
        self.phase = 0
        self._mixer = DeficitMixer(self.phases[0].weights(self.domains))
        self._cursor: dict[str, list[int] | None] = {d: None for d in self.domains}  # [doc, next start]

    # ------------------------------------------------------------------ iteration
    @property
    def batch_tokens(self) -> int:
        """Tokens one step consumes over all ranks (what tokens_seen advances by)."""
        return self.batch_size * self.seq_len * self.world_size

    def __len__(self) -> int:
        """Batches left until the budget is reached."""
        return max(0, -(-(self.total_tokens - self.tokens_seen) // self.batch_tokens))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.tokens_seen >= self.total_tokens:
            raise StopIteration
        k = phase_at(self.tokens_seen, self.phase_boundaries)
        if k != self.phase:
            self._enter_phase(k)
        B, T = self.batch_size, self.seq_len
        input_ids = np.full((B, T), self.pad_id, np.int64)
        labels = np.full((B, T), -100, np.int64)
        position_ids = np.zeros((B, T), np.int64)
        placed = 0
        for b in range(B):
            self._refill()
            pos = 0
            for _, item in self.buffer.fill(T):
                toks = self._materialise(item)
                n = len(toks)
                input_ids[b, pos:pos + n] = toks
                labels[b, pos + 1:pos + n] = toks[1:]
                position_ids[b, pos:pos + n] = np.arange(n)
                self.emitted[self.phase][item[0]] += n
                pos += n
            position_ids[b, pos:] = np.arange(T - pos)  # padding is its own "document"
            self.pad_tokens += T - pos
            placed += pos
        if placed == 0:
            raise RuntimeError(
                f"Loader: every domain of {self.store.root} reached the repetition cap "
                f"(max_repeats={self.max_repeats}) at {self.tokens_seen} of {self.total_tokens} tokens; "
                "prepare more data, raise max_repeats or lower total_tokens")
        self.tokens_seen += self.batch_tokens
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(position_ids)}

    def _enter_phase(self, k: int) -> None:
        self.phase = k
        self.buffer.clear()
        self._mixer = DeficitMixer(self.phases[k].weights(self.domains))

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            live = {d for d in self.domains if self._cursor[d] is not None or not self.streams[d].exhausted}
            d = self._mixer.choose(live)
            if d is None:
                return  # every domain is at its repetition cap: rows are padded, an empty batch raises
            if self._cursor[d] is None:
                doc = self.streams[d].next()
                if doc is None:
                    continue  # that stream just reached the cap; choose again among the rest
                self._cursor[d] = [doc, 0]
            self._push_piece(d)

    def _push_piece(self, d: str) -> None:
        """Push the next piece of domain d's current document (one piece per draw, so a long
        document cannot swing the mixture by more than one piece)."""
        phase = self.phases[self.phase]
        doc, start = self._cursor[d]
        n_doc = int(self.store.doc_lens(d)[doc])
        length = min(self.seq_len - 2 - OVERHEAD, n_doc - start)
        first, last = int(start == 0), int(start + length == n_doc)
        mode, i, j = 0, 0, 0
        if phase.fim_rate > 0 and (d == "code" or not phase.fim_code_only) and self.rng.random() < phase.fim_rate:
            mode = PSM if self.rng.random() < 1.0 - phase.spm_rate else SPM
            i, j = draw_cuts(length, self.rng)
        n = length + first + _closes(last, mode) + (OVERHEAD if mode else 0)
        self.buffer.push(n, (d, int(doc), start, length, first, last, mode, i, j))
        self._mixer.add(d, n)
        self._cursor[d] = None if last else [doc, start + length]

    def _materialise(self, item: tuple) -> np.ndarray:
        d, doc, start, length, first, last, mode, i, j = item
        toks = self.store.doc(d, doc, start, length)
        if mode:
            toks = apply_fim(toks, i, j, mode, self.fim_ids)
        end = _closes(last, mode)
        if first or end:
            toks = np.concatenate([[self.bos_id] * first, toks, [self.eot_id] * end]).astype(np.int64)
        return toks

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "data": self.store.fingerprint(), "seed": self.seed, "rank": self.rank,
            "world_size": self.world_size, "total_tokens": self.total_tokens, "seq_len": self.seq_len,
            "batch_size": self.batch_size, "tokens_seen": self.tokens_seen, "phase": self.phase,
            "pad_tokens": self.pad_tokens, "emitted": [dict(e) for e in self.emitted],
            "drawn": dict(self._mixer.drawn), "streams": {d: s.state() for d, s in self.streams.items()},
            "cursor": dict(self._cursor),
            "rng": self.rng.bit_generator.state, "buffer": self.buffer.state(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore a `state_dict()`; the seed, rank, world size, budget and data must match. A new
        batch_size is fine; a new seq_len discards the buffered pieces (packing restarts)."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(f"Loader.load_state_dict: expected a state dict with version {STATE_VERSION}")
        mine = {"data": self.store.fingerprint(), "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "total_tokens": self.total_tokens}
        for key, want in mine.items():
            if sd.get(key) != want:
                raise ValueError(f"Loader.load_state_dict: state has {key}={sd.get(key)!r}, this loader "
                                 f"has {want!r}" + (" (different prepared data)" if key == "data" else ""))
        self.tokens_seen, self.pad_tokens = int(sd["tokens_seen"]), int(sd["pad_tokens"])
        self._enter_phase(int(sd["phase"]))
        self.emitted = [{d: int(e.get(d, 0)) for d in self.domains} for e in sd["emitted"]]
        self._mixer.drawn = {d: int(v) for d, v in sd["drawn"].items()}
        for d, s in sd["streams"].items():
            self.streams[d].load_state(s)
        self._cursor = {d: (None if c is None else [int(c[0]), int(c[1])]) for d, c in sd["cursor"].items()}
        self.rng.bit_generator.state = sd["rng"]
        if int(sd["seq_len"]) == self.seq_len:
            self.buffer.load_state(sd["buffer"])

    def stats(self) -> dict:
        """Emitted content tokens per phase and domain, their shares, padding, epochs per domain."""
        shares = []
        for e in self.emitted:
            tot = sum(e.values())
            shares.append({d: v / tot for d, v in e.items()} if tot else {})
        return {"phase": self.phase, "tokens_seen": self.tokens_seen, "emitted": self.emitted, "shares": shares,
                "pad_fraction": self.pad_tokens / max(self.tokens_seen // self.world_size, 1),
                "epochs": {d: s.epoch + s.pos / max(s.n, 1) for d, s in self.streams.items()}}
