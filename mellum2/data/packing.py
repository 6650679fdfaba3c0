"""Packing documents into fixed-length rows: best-fit over a buffer, and greedy concatenation.

Mellum 2 packs with best-fit (docs/mellum2.md §3) to truncate fewer documents than concatenating
the stream and cutting it every `seq_len` tokens. Our best-fit:

- a document longer than the largest piece (`max_piece`) is cut into consecutive pieces of at most
  that size (the only documents split across rows; every token is kept);
- pieces wait in a buffer; a row is filled by repeatedly taking the largest buffered piece that still
  fits the space left (ties: the oldest piece), and any remaining gap is padding;
- a larger buffer fits better (less padding) but delays documents longer.

`BestFitBuffer` is the online structure the loader uses (its contents are plain tuples, so the loader
can save and restore them exactly); `pack_best_fit` / `pack_greedy` pack a whole list of document
lengths offline and report how many documents each splits, which `mellum2 data prepare` prints.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


def chunk_spans(n: int, max_len: int) -> list[tuple[int, int]]:
    """(start, length) pieces covering [0, n) with length <= max_len each; [] for n == 0."""
    if max_len < 1:
        raise ValueError(f"chunk_spans: max_len must be >= 1, got {max_len}")
    return [(s, min(max_len, n - s)) for s in range(0, n, max_len)]


class BestFitBuffer:
    """Pieces (length, item) waiting to be packed; `fill(capacity)` takes a best-fitting set."""

    def __init__(self):
        self._keys: list[tuple[int, int]] = []  # sorted (length, -seq): the oldest wins a tie
        self._items: dict[int, Any] = {}
        self.seq = 0  # pieces ever pushed: gives every piece a unique, ordered id
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._keys)

    def push(self, length: int, item: Any) -> None:
        if length < 1:
            raise ValueError(f"BestFitBuffer.push: length must be >= 1, got {length}")
        bisect.insort(self._keys, (length, -self.seq))
        self._items[self.seq] = item
        self.seq += 1
        self.tokens += length

    def pop_fit(self, capacity: int) -> tuple[int, Any] | None:
        """Remove and return the largest piece with length <= capacity (None if none fits)."""
        k = bisect.bisect_right(self._keys, (capacity, 1)) - 1
        if k < 0:
            return None
        length, neg_seq = self._keys.pop(k)
        self.tokens -= length
        return length, self._items.pop(-neg_seq)

    def fill(self, capacity: int) -> list[tuple[int, Any]]:
        """Pieces for one row of `capacity` tokens, largest-that-fits first."""
        out, left = [], capacity
        while left > 0:
            got = self.pop_fit(left)
            if got is None:
                break
            out.append(got)
            left -= got[0]
        return out

    def clear(self) -> None:
        self._keys.clear()
        self._items.clear()
        self.tokens = 0

    def state(self) -> dict:
        """{"seq", "pieces": [[length, seq, item], ...]} (items must be JSON-serialisable for JSON)."""
        return {"seq": self.seq, "pieces": [[n, -neg, self._items[-neg]] for n, neg in self._keys]}

    def load_state(self, state: dict) -> None:
        self.clear()
        self.seq = int(state["seq"])
        for length, seq, item in state["pieces"]:
            self._keys.append((int(length), -int(seq)))
            self._items[int(seq)] = tuple(item) if isinstance(item, list) else item
            self.tokens += int(length)
        self._keys.sort()


@dataclass
class PackResult:
    rows: list[list[tuple[int, int, int]]] = field(default_factory=list)  # [(doc, start, length), ...]
    n_docs: int = 0
    n_split: int = 0  # documents whose tokens land in more than one row
    pad_tokens: int = 0
    seq_len: int = 0

    @property
    def split_rate(self) -> float:
        return self.n_split / max(self.n_docs, 1)

    @property
    def pad_fraction(self) -> float:
        return self.pad_tokens / max(len(self.rows) * self.seq_len, 1)


def pack_best_fit(lengths: Sequence[int], seq_len: int, buffer_size: int = 256,
                  max_piece: int | None = None) -> PackResult:
    """Pack documents of `lengths` in order through a best-fit buffer of `buffer_size` pieces."""
    max_piece = seq_len if max_piece is None else max_piece
    if not 1 <= max_piece <= seq_len:
        raise ValueError(f"pack_best_fit: need 1 <= max_piece <= seq_len, got {max_piece}, {seq_len}")
    res = PackResult(n_docs=len(lengths), seq_len=seq_len)
    buf = BestFitBuffer()

    def emit():
        row = buf.fill(seq_len)
        res.rows.append([item for _, item in row])
        res.pad_tokens += seq_len - sum(n for n, _ in row)

    for doc, n in enumerate(lengths):
        spans = chunk_spans(int(n), max_piece)
        res.n_split += len(spans) > 1
        for start, length in spans:
            buf.push(length, (doc, start, length))
        while len(buf) >= buffer_size:
            emit()
    while len(buf):
        emit()
    return res


def pack_greedy(lengths: Sequence[int], seq_len: int) -> PackResult:
    """Concatenate all documents and cut every `seq_len` tokens (the baseline best-fit improves on)."""
    if seq_len < 1:
        raise ValueError(f"pack_greedy: seq_len must be >= 1, got {seq_len}")
    res = PackResult(n_docs=len(lengths), seq_len=seq_len)
    row: list[tuple[int, int, int]] = []
    left = seq_len
    for doc, n in enumerate(lengths):
        start, pieces = 0, 0
        while start < n:
            take = min(left, n - start)
            row.append((doc, start, take))
            start, left, pieces = start + take, left - take, pieces + 1
            if left == 0:
                res.rows.append(row)
                row, left = [], seq_len
        res.n_split += pieces > 1
    if row:
        res.rows.append(row)
        res.pad_tokens = left
    return res


def tokens_of(res: PackResult) -> dict[int, list[tuple[int, int]]]:
    """doc -> sorted (start, length) spans placed in rows (to check nothing was lost or duplicated)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for row in res.rows:
        for doc, start, length in row:
            out.setdefault(doc, []).append((start, length))
    return {d: sorted(v) for d, v in out.items()}


def covers(spans: Iterable[tuple[int, int]], n: int) -> bool:
    """True if `spans` tile [0, n) exactly once."""
    pos = 0
    for start, length in sorted(spans):
        if start != pos or length < 1:
            return False
        pos += length
    return pos == n
