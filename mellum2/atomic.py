"""Atomic file writes: a reader sees the old file or the whole new one, never a torn one.

Each writer goes to a temporary sibling (same directory, so `os.replace` is a rename on one file
system), flushes and fsyncs it, then renames it over the target. A failure removes the temporary and
raises `DiskError` naming the path. Everything in the project that writes a file a later run reads
(configs, metrics, summaries, plots, tokenizers, checkpoints) goes through here.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mellum2.errors import DiskError, describe_os_error


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed to `path`.

    For writers that want a file name (torch.save, safetensors, matplotlib's savefig)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise DiskError(f"cannot write {path}: {describe_os_error(e)}") from None
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DiskError(f"cannot write {path}: {describe_os_error(e)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory (so the files' names are durable too)."""
    dirs = [root]
    for p in sorted(root.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            dirs.append(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(dirs):
        _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `path`; on success its files are fsynced and it
    replaces `path` (an existing directory is moved aside first and removed after the rename), so
    `path` is never half written. For checkpoints, tokenizers and anything else that is a directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise DiskError(f"cannot write {path}: {describe_os_error(e)}") from None
    try:
        yield tmp
        fsync_tree(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskError(f"cannot write {path}: {describe_os_error(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
