"""One writer per run directory: an exclusive lock held for the whole life of a run.

Every command that writes into a run directory (`mellum2 train`, fresh or `--resume`, the
long-context stage, `train-mtp`'s output, the post-training stages) takes `RunLock(dir)` before it
writes anything. The lock is `flock(LOCK_EX | LOCK_NB)` on `DIR/.lock`: the kernel releases it when
the process ends in any way (exit, exception, SIGKILL, OOM kill), so a lock can never outlive its
holder. The file also records who holds it (pid, host, start time, command line) so that:

- a second process is refused with one line naming the holder (`RunLocked`, exit 1) and writes
  nothing: it opens the existing lock file read-write without truncating it, and fails before any
  other file is touched;
- a lock file still naming a process that no longer holds the lock (a killed run) is taken over
  with a message saying whose it was.

The file is truncated, not removed, on release: removing it would let a third process lock a new
inode while a second still waits on the old one. flock is advisory and per host (on NFS it may not
exclude another machine), the same contract torchtitan/DCP runs rely on for one job per directory.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mellum2.errors import DiskError, MellumError, describe_os_error

LOCK_FILE = ".lock"


class RunLocked(MellumError, RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """`with RunLock(out, say=print): ...` holds `out/.lock` exclusively (creating `out` if needed).

    `lock_file` overrides where the lock lives (for an output that is replaced as a whole, such as
    train-mtp's checkpoint directory, a sibling file: `sibling_lock_file`)."""

    def __init__(self, directory: str | os.PathLike, *, lock_file: str | os.PathLike | None = None, say=print):
        self.dir = Path(directory)
        self.path = Path(lock_file) if lock_file is not None else self.dir / LOCK_FILE
        self.say = say
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DiskError(f"cannot lock {self.dir}: {describe_os_error(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise RunLocked(f"{self.dir} is in use by another run ({holder}); wait for it to finish, stop it, "
                            f"or choose another output directory") from None
        except OSError as e:  # a file system without flock support
            os.close(fd)
            raise DiskError(f"cannot lock {self.path}: {describe_os_error(e)}") from None
        prev = _read_holder(fd)
        if prev:  # only a holder that did not release (a killed process) leaves its record behind
            self.say(f"note: taking over the lock of {self.dir} left by {_describe(prev)}, which no longer runs")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "argv": " ".join(sys.argv)[:500]}
        data = (json.dumps(record) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as e:
            os.close(fd)
            raise DiskError(f"cannot lock {self.dir}: {describe_os_error(e, str(self.path))}") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no record: the next run takes it silently
        except OSError:
            pass  # a read-only or full disk: the next run reports a stale record, nothing worse
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def sibling_lock_file(target: str | os.PathLike) -> Path:
    """`PARENT/.NAME.lock` for a directory that is written as a whole (replaced atomically)."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return {"pid": "?"}  # a garbled record is still someone's


def _describe(h: dict | None) -> str:
    if not h:
        return "pid unknown"
    since = h.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')}, since {when}: {h.get('argv', '')}".rstrip(": ")
