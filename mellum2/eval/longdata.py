"""Long held-out code for context evaluations: repository-level sequences.

Files of one package are concatenated in the same repository-level layout as the long-context training
samples (`ShardStore.repo_sample`, StarCoder's): `<reponame>` package, then per file `<filename>`
relative/path, a newline and its source, then `<|endoftext|>`. The default source is the `pip` package of the running interpreter: pure Python present on
every machine with a venv, and never part of the embedded training corpus (site-packages excluded).
"""
from __future__ import annotations

import random
from pathlib import Path


def default_root() -> Path:
    import pip  # only to find its directory, and only for the default source

    return Path(pip.__file__).parent


def packages(root: Path, ext: str = ".py") -> dict[str, list[Path]]:
    """Directory -> its source files (sorted), for every directory under root holding any."""
    groups: dict[str, list[Path]] = {}
    for p in sorted(root.rglob(f"*{ext}")):
        if p.is_file():
            groups.setdefault(str(p.parent.relative_to(root.parent)), []).append(p)
    return groups


def repo_sequences(tok, length: int, n: int, root: Path | None = None, seed: int = 0) -> list[list[int]]:
    """`n` sequences of exactly `length` tokens, each the concatenated files of whole packages
    (packages taken in a seeded random order; a sequence continues into the next package if needed)."""
    root = Path(root) if root else default_root()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory of source files")
    groups = packages(root)
    if not groups:
        raise ValueError(f"{root}: no source files found")
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    seqs, cur = [], []
    for name in names:
        cur += [tok.reponame_id] + tok.encode(name, allow_special=False)
        for path in groups[name]:
            text = path.read_text(errors="replace")
            rel = path.relative_to(root.parent / name)
            cur += [tok.file_sep_id] + tok.encode(f"{rel}\n{text}", allow_special=False)
        cur.append(tok.eot_id)
        while len(cur) >= length and len(seqs) < n:
            seqs.append(cur[:length])
            cur = []  # a fresh package starts the next sequence
        if len(seqs) == n:
            return seqs
    if not seqs:
        raise ValueError(f"{root}: not enough source text for one sequence of {length} tokens")
    return seqs
