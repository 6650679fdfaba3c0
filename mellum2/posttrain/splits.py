"""Seeded generation and the train / held-out split shared by the post-training data generators.

Every generated item (an SFT conversation, an RL task) is a pure function of (seed, split, stream,
index): `rng` seeds a `random.Random` from that string, so any prefix of a stream is reproducible and
two processes generate the same data.

The split is decided by the item's *key*, not by its position: a key is the template name plus the
constants that make the task what it is (operands, the character to count, the entity to look up),
never the cosmetic choices (function names, phrasing). `heldout(key)` hashes the key with blake2b and
puts about 20% of the key space in the held-out split. `draw` rejection-samples a generator until its
key falls in the wanted split, so a held-out task is never a train task with another function name
or wording: memorising train answers does not answer held-out prompts. Where phrasing is the whole
task (identity questions, ambiguous requests) the phrasings themselves are split (`split_list`).
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable, Sequence, TypeVar

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2
T = TypeVar("T")


class SplitExhausted(RuntimeError):
    """A generator kept producing keys of the other split: its key space is too small or one-sided."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def heldout(key: str) -> bool:
    """True when `key` belongs to the held-out split (about HELDOUT_FRACTION of all keys)."""
    return _h("split:" + key) % 1000 < HELDOUT_FRACTION * 1000


def stable_id(key: str, prefix: str = "") -> str:
    """A short id that depends only on the key."""
    return f"{prefix}{_h('id:' + key):016x}"[: len(prefix) + 12]


def rng(seed: int, split: str, stream: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{split}:{stream}:{index}")


def draw(make: Callable[[random.Random], T], key: Callable[[T], str], split: str, r: random.Random,
         tries: int = 2000) -> T:
    """make(r) until key(item) lies in `split`."""
    want = split == "heldout"
    for _ in range(tries):
        item = make(r)
        if heldout(key(item)) == want:
            return item
    raise SplitExhausted(f"{getattr(make, '__name__', make)}: no {split} item in {tries} draws")


def split_list(items: Sequence[T], split: str, every: int = 4) -> list[T]:
    """A fixed partition of a phrasing list: every `every`-th item (from index every-1) is held out."""
    check_split(split)
    held = [x for i, x in enumerate(items) if i % every == every - 1]
    return held if split == "heldout" else [x for i, x in enumerate(items) if i % every != every - 1]
