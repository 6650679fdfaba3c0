"""Exact and near-duplicate removal at file level: a content hash and MinHash + LSH (numpy only).

Mellum 2 deduplicates code with MinHash at file level (docs/mellum2.md §3); we follow the StarCoder
recipe where the report is silent: shingles are 5-grams of whitespace-separated words, 128 hash
functions, LSH with 32 bands of 4 rows (a pair with Jaccard 0.7 becomes a candidate with probability
1 - (1 - 0.7^4)^32 > 0.999), and a candidate is a duplicate when its estimated Jaccard similarity to an
already kept document is at least 0.7.

Both dedups are streaming and keep-first: a document is compared only with documents kept before it,
so the output is deterministic given the input order and only signatures (128 x 4 bytes per kept
document) and band buckets stay in memory - never the texts.

Hashing is deterministic across processes (crc32 of words, fixed-seed multiply-shift hash family),
unlike Python's salted `hash()`.
"""
from __future__ import annotations

import hashlib
import zlib

import numpy as np

MASK32 = np.uint64(0xFFFFFFFF)


def content_key(text: str) -> bytes:
    """Exact-duplicate key: blake2b of the text with trailing whitespace of every line removed."""
    norm = "\n".join(ln.rstrip() for ln in text.strip().splitlines())
    return hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ExactDedup:
    """`seen(text)` is True for a text whose normalised content was seen before (then it is dropped)."""

    def __init__(self):
        self._keys: set[bytes] = set()

    def seen(self, text: str) -> bool:
        key = content_key(text)
        if key in self._keys:
            return True
        self._keys.add(key)
        return False


class MinHasher:
    """MinHash signatures of word n-gram shingles: sig[k] = min over shingles s of h_k(s)."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        if num_perm < 1 or ngram < 1:
            raise ValueError(f"MinHasher: num_perm and ngram must be >= 1, got {num_perm}, {ngram}")
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.mix = rng.integers(1, 2**63, ngram, dtype=np.uint64) | np.uint64(1)

    def shingles(self, text: str) -> np.ndarray:
        """uint64 hashes of the distinct word n-grams of `text` (one shingle if it is shorter)."""
        words = text.split()
        if not words:
            return np.zeros(0, np.uint64)
        h = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), np.uint64, len(words))
        n = max(len(h) - self.ngram + 1, 1)
        sh = np.zeros(n, np.uint64)
        with np.errstate(over="ignore"):  # arithmetic mod 2^64 is intended
            for k in range(min(self.ngram, len(h))):
                sh += h[k:k + n] * self.mix[k]
        return np.unique(sh)

    def signature(self, text: str) -> np.ndarray:
        """[num_perm] uint32 signature; an empty text gets all-ones (never similar to real text)."""
        sh = self.shingles(text)
        sig = np.full(self.num_perm, 0xFFFFFFFF, np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(sh), 2048):  # bounds memory at 2048 x num_perm x 8 bytes
                s_S1 = sh[start:start + 2048, None]
                h_SP = (s_S1 * self.a[None, :] + self.b[None, :]) >> np.uint64(32)  # multiply-shift
                np.minimum(sig, h_SP.min(axis=0), out=sig)
        return sig.astype(np.uint32)


def jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two documents from their signatures."""
    return float(np.mean(sig_a == sig_b))


def true_jaccard(hasher: MinHasher, a: str, b: str) -> float:
    """Exact Jaccard of the shingle sets (the reference the signature estimates; for tests)."""
    sa, sb = set(hasher.shingles(a).tolist()), set(hasher.shingles(b).tolist())
    return len(sa & sb) / max(len(sa | sb), 1)


class NearDedup:
    """Streaming MinHash-LSH: `seen(text)` is True if `text` is a near-duplicate of a kept text."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, bands: int = 32, ngram: int = 5,
                 seed: int = 0):
        if num_perm % bands:
            raise ValueError(f"NearDedup: num_perm ({num_perm}) must be a multiple of bands ({bands})")
        if not 0 < threshold <= 1:
            raise ValueError(f"NearDedup: threshold must be in (0, 1], got {threshold}")
        self.threshold, self.bands, self.rows = threshold, bands, num_perm // bands
        self.hasher = MinHasher(num_perm, ngram, seed)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._sigs = np.zeros((1024, num_perm), np.uint32)
        self._n = 0
        self.n_candidates = 0  # candidate pairs verified (for the stats)

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        return [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def seen(self, text: str) -> bool:
        sig = self.hasher.signature(text)
        keys = self._band_keys(sig)
        cands = set()
        for bucket, key in zip(self._buckets, keys):
            cands.update(bucket.get(key, ()))
        if cands:
            idx = np.fromiter(cands, np.int64, len(cands))
            self.n_candidates += len(idx)
            if (self._sigs[idx] == sig).mean(axis=1).max() >= self.threshold:
                return True
        if self._n == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[self._n] = sig
        for bucket, key in zip(self._buckets, keys):
            bucket.setdefault(key, []).append(self._n)
        self._n += 1
        return False

    def __len__(self) -> int:
        return self._n
