"""Token shards on disk: document-level token storage, memory-mapped, with an index; writes atomic.

Layout of a prepared data directory:

    index.json                  written last; its presence means the directory is complete
    stats.json                  filter/dedup counts and the summary of `mellum2 data prepare`
    tokenizer/                  tokenizer.json + tokenizer_config.json used for the shards
    shards/{domain}-{k:05d}.bin         token ids of the shard's documents, back to back (raw
                                        little-endian uint16 when vocab <= 65536, else uint32)
    shards/{domain}-{k:05d}.idx.npy     int64 offsets [n_docs + 1] into the .bin
    shards/{domain}-{k:05d}.meta.jsonl  one {"lang", "source", "group"} object per document

Documents are stored whole and untouched (no bos/eos, no FIM, no packing): the loader packs them into
rows of whatever length the trainer asks for. Every file is written to a temporary name and renamed
into place; the index (with each shard's size and blake2b checksum) is renamed last, so a crash leaves
either no index or one whose shards are all complete. `ShardStore` checks sizes and offsets on open
(cheap) and `verify()` checks every checksum.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from mellum2 import atomic
from mellum2.errors import MellumError

INDEX = "index.json"
FORMAT = "mellum2-shards"
VERSION = 1


class ShardError(MellumError, ValueError):
    """A missing, incomplete or corrupt data directory; the message names the file and the problem."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents of one domain; rolls to a new shard every `shard_tokens` tokens."""

    def __init__(self, root: Path, domain: str, dtype: np.dtype, shard_tokens: int = 64 << 20):
        self.dir = Path(root) / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.domain, self.dtype, self.shard_tokens = domain, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self._k = 0
        self._open()

    def _open(self) -> None:
        self.name = f"{self.domain}-{self._k:05d}"
        self._tmp = self.dir / f".{self.name}.bin.tmp{os.getpid()}"
        self._f = open(self._tmp, "wb")
        self._hash = hashlib.blake2b(digest_size=16)
        self._offsets = [0]
        self._meta: list[str] = []

    def add(self, ids: np.ndarray | list[int], meta: dict) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        if arr.ndim != 1:
            raise ValueError(f"ShardWriter.add: ids must be 1-D, got shape {arr.shape}")
        buf = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        self._f.write(buf)
        self._hash.update(buf)
        self._offsets.append(self._offsets[-1] + len(arr))
        self._meta.append(json.dumps({k: meta.get(k, "") for k in ("lang", "source", "group")}, ensure_ascii=False))
        if self._offsets[-1] >= self.shard_tokens:
            self._close_shard()
            self._k += 1
            self._open()

    def _close_shard(self) -> None:
        self._f.close()
        if len(self._offsets) == 1:  # nothing written to this shard
            self._tmp.unlink()
            return
        base = self.dir / self.name
        with atomic.atomic_path(f"{base}.idx.npy", suffix=".npy") as idx_tmp:
            np.save(idx_tmp, np.asarray(self._offsets, np.int64))
        atomic.write_text(f"{base}.meta.jsonl", "\n".join(self._meta) + "\n")
        os.replace(self._tmp, f"{base}.bin")  # the shard is streamed to its temporary; complete now
        self.shards.append({"name": self.name, "domain": self.domain, "n_docs": len(self._offsets) - 1,
                            "n_tokens": self._offsets[-1], "bytes": self._offsets[-1] * self.dtype.itemsize,
                            "blake2b": self._hash.hexdigest()})

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards


def write_index(root: Path, shards: list[dict], dtype: np.dtype, vocab_size: int, special_ids: dict,
                extra: dict | None = None) -> dict:
    domains: dict[str, dict] = {}
    for s in shards:
        d = domains.setdefault(s["domain"], {"n_docs": 0, "n_tokens": 0})
        d["n_docs"] += s["n_docs"]
        d["n_tokens"] += s["n_tokens"]
    index = {"format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
             "special_ids": special_ids, "tokenizer": "tokenizer", "domains": domains, "shards": shards,
             **(extra or {})}
    atomic.write_text(Path(root) / INDEX, json.dumps(index, indent=1))
    return index


def read_index(root: str | Path) -> dict:
    path = Path(root) / INDEX
    if not Path(root).is_dir():
        raise ShardError(f"{root}: no such data directory (run `mellum2 data prepare --out {root}`)")
    if not path.is_file():
        raise ShardError(f"{path}: missing - the directory is not a complete prepared dataset "
                         f"(an interrupted `mellum2 data prepare`? run it again)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: corrupt index, not JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{path}: not a mellum2 shard index (format must be {FORMAT!r})")
    if index.get("version") != VERSION:
        raise ShardError(f"{path}: index version {index.get('version')!r}, this code reads version {VERSION}")
    for key in ("dtype", "vocab_size", "special_ids", "shards", "domains"):
        if key not in index:
            raise ShardError(f"{path}: index has no {key!r} field")
    return index


class ShardStore:
    """Read-only view of a prepared directory: per-domain documents as memory-mapped token arrays."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index = read_index(self.root)
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        self.special_ids = dict(self.index["special_ids"])
        self.domains: dict[str, list[tuple[np.memmap, np.ndarray, dict]]] = {}
        for s in self.index["shards"]:
            self.domains.setdefault(s["domain"], []).append(self._open(s))
        # per domain: cumulative doc counts over its shards, and all document lengths
        self._starts = {d: np.cumsum([0] + [len(o) - 1 for _, o, _ in sh]) for d, sh in self.domains.items()}
        self._lens = {d: np.concatenate([np.diff(o) for _, o, _ in sh]) for d, sh in self.domains.items()}
        self._meta_cache: dict[str, list[dict]] = {}

    def _open(self, s: dict) -> tuple[np.memmap, np.ndarray, dict]:
        base = self.root / "shards" / s["name"]
        bin_, idx = Path(f"{base}.bin"), Path(f"{base}.idx.npy")
        for p in (bin_, idx, Path(f"{base}.meta.jsonl")):
            if not p.is_file():
                raise ShardError(f"{p}: missing shard file listed in {self.root / INDEX}")
        if bin_.stat().st_size != s["bytes"]:
            raise ShardError(f"{bin_}: {bin_.stat().st_size} bytes, the index says {s['bytes']} (truncated or corrupt)")
        try:
            offsets = np.load(idx)
        except (ValueError, OSError, EOFError) as e:
            raise ShardError(f"{idx}: corrupt offsets file ({e})") from None
        if (offsets.ndim != 1 or len(offsets) != s["n_docs"] + 1 or offsets[0] != 0
                or offsets[-1] != s["n_tokens"] or np.any(np.diff(offsets) < 0)):
            raise ShardError(f"{idx}: offsets must be {s['n_docs'] + 1} non-decreasing values from 0 to "
                             f"{s['n_tokens']}, got shape {offsets.shape}")
        tokens = np.memmap(bin_, dtype=self.dtype.newbyteorder("<"), mode="r") if s["n_tokens"] else np.zeros(0, self.dtype)
        return tokens, offsets, s

    def n_docs(self, domain: str) -> int:
        return int(self._starts[domain][-1]) if domain in self._starts else 0

    def doc_lens(self, domain: str) -> np.ndarray:
        return self._lens.get(domain, np.zeros(0, np.int64))

    def _locate(self, domain: str, i: int) -> tuple[int, int]:
        if not 0 <= i < self.n_docs(domain):
            raise IndexError(f"{self.root}: domain {domain!r} has {self.n_docs(domain)} documents, asked for {i}")
        k = int(np.searchsorted(self._starts[domain], i, side="right") - 1)
        return k, i - int(self._starts[domain][k])

    def doc(self, domain: str, i: int, start: int = 0, length: int | None = None) -> np.ndarray:
        """Token ids of document i of `domain` (optionally the slice [start, start+length)), as int64."""
        k, j = self._locate(domain, i)
        tokens, offsets, _ = self.domains[domain][k]
        lo, hi = int(offsets[j]), int(offsets[j + 1])
        end = hi if length is None else min(hi, lo + start + length)
        return np.asarray(tokens[lo + start:end], dtype=np.int64)

    def meta(self, domain: str, i: int) -> dict:
        """{"domain", "lang", "source", "group"} of document i of `domain`."""
        k, j = self._locate(domain, i)
        name = self.domains[domain][k][2]["name"]
        if name not in self._meta_cache:
            path = self.root / "shards" / f"{name}.meta.jsonl"
            self._meta_cache[name] = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln]
        return {"domain": domain, **self._meta_cache[name][j]}

    def groups(self, domain: str = "code") -> dict[str, list[int]]:
        """group (package / directory / repository) -> indices of its documents, in storage order."""
        out: dict[str, list[int]] = {}
        for i in range(self.n_docs(domain)):
            out.setdefault(self.meta(domain, i)["group"], []).append(i)
        return out

    def iter_group(self, group: str, domain: str = "code") -> Iterator[tuple[dict, np.ndarray]]:
        """(meta, token ids) of every document of `group`, in storage order (e.g. one package's files)."""
        for i in self.groups(domain).get(group, []):
            yield self.meta(domain, i), self.doc(domain, i)

    def repo_sample(self, group: str, tokenizer, domain: str = "code") -> np.ndarray:
        """One repository-level sample of `group` in StarCoder's layout: `<reponame>` group, then per
        file `<filename>` relative/path + newline + its tokens, then `<|endoftext|>` (the raw material
        of a long-context stage; `tokenizer` encodes the names)."""
        docs = list(self.iter_group(group, domain))
        if not docs:
            raise KeyError(f"{self.root}: no {domain} documents in group {group!r}")
        ids = self.special_ids
        paths = [m["source"] for m, _ in docs]
        base = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
        parts = [[ids["reponame"]], tokenizer.encode(group, allow_special=False)]
        for (meta, toks), path in zip(docs, paths):
            rel = os.path.relpath(path, base) if base else path
            parts += [[ids["file_sep"]], tokenizer.encode(rel + "\n", allow_special=False), toks]
        parts.append([ids["eot"]])
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

    def fingerprint(self) -> str:
        """Identifies the dataset (shard checksums); a loader state names the data it was drawn from."""
        h = hashlib.blake2b(digest_size=8)
        for s in self.index["shards"]:
            h.update(f"{s['name']}:{s['blake2b']}".encode())
        return h.hexdigest()


def verify(root: str | Path) -> list[str]:
    """Check every shard's checksum; returns the problems found (empty when all is well)."""
    store = ShardStore(root)  # raises on size/offset problems
    problems = []
    for s in store.index["shards"]:
        path = store.root / "shards" / f"{s['name']}.bin"
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != s["blake2b"]:
            problems.append(f"{path}: checksum mismatch (index {s['blake2b']}, file {h.hexdigest()})")
    return problems
