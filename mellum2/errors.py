"""The one user-facing error base. Anything a user can cause (a bad flag, a missing or damaged file,
an invalid config, a full disk) is raised as a `MellumError` subclass whose message names the file,
flag or field that is wrong and what was expected; the `mellum2` dispatcher prints it as one line
(`mellum2 <stage>: error: ...`) and exits 1. Programming errors stay ordinary exceptions with
tracebacks.

`run_stage` is that printing, for the dispatcher and for stage modules run with `python -m`.

Subclasses also derive from the builtin they refine (ValueError, RuntimeError, OSError) so callers
that catch the builtin keep working.
"""
from __future__ import annotations

import errno
import sys


class MellumError(Exception):
    """A user-facing error: printed as one line by the CLI, exit status 1."""

    exit_code = 1


class UsageError(MellumError, ValueError):
    """Nonsense or out-of-range arguments (a flag, a request field)."""

    exit_code = 2


class DiskError(MellumError, OSError):
    """A write that failed for a reason outside the program: full disk, permissions, a path that is a file."""


class NotFoundError(MellumError, FileNotFoundError):
    """A file or directory the user named (or one expected inside it) does not exist."""


def describe_os_error(e: OSError, what: str = "") -> str:
    """One line for an OSError: the path, what failed, and the usual remedy."""
    path = e.filename or what or "?"
    hints = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
             errno.EROFS: "read-only file system", errno.ENOTDIR: "a parent is a file, not a directory",
             errno.EISDIR: "is a directory", errno.EEXIST: "already exists", errno.ENOENT: "no such file or directory",
             errno.EDQUOT: "disk quota exceeded"}
    return f"{path}: {hints.get(e.errno, e.strerror or str(e))}"


def run_stage(stage: str, main, argv: list[str] | None = None) -> int:
    """`main(argv)` of a stage with the errors a user can cause printed as one line
    (`mellum2 <stage>: error: ...`) and their exit code. The dispatcher (mellum2/cli.py) runs every
    stage through it, and so does a stage module started on its own (`python -m mellum2.train.pretrain`,
    as torchrun does)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(main(argv) or 0)
    except MellumError as e:  # anything a user can cause: one line, no traceback
        print(f"mellum2 {stage}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mellum2 {stage}: interrupted", file=sys.stderr)
        return 130
