"""Keep freed host memory in the process: no page-fault storm on every large CPU tensor.

PyTorch's CPU allocator is glibc malloc. By default glibc serves blocks above its mmap threshold
(128 KiB, rising to at most 32 MiB) with fresh `mmap`s and returns them with `munmap` on free, and
trims the heap top back to the OS. A training step on the CPU allocates and frees the same few
hundred activation tensors of 1-128 MiB every step, so every step faults all of that memory in again,
page by page: measured on the 2-core VM this project is built on (`tiny`, bf16, batch 8 x 512), about
240,000 minor faults and 0.5 s of system time per forward + backward, 14-23% of the step. With the
thresholds raised, freed blocks stay in the heap and are reused: ~0 faults, system time ~0.02 s.

`keep_freed_memory()` raises them once per process (glibc only; elsewhere it does nothing). The cost:
the process's resident size stays at its peak instead of shrinking between steps. The `mellum2` CLI
calls it at start; the benchmarks call it for both sides of every comparison. Set
`MELLUM2_MALLOC=default` to leave glibc's defaults alone (`keep`, the default, or unset: tune). (The usual alternative is to LD_PRELOAD
jemalloc or tcmalloc, which needs a library this project cannot assume.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (and pad heap growth) so freed tensors are reused.
    Returns True when the settings are in effect, False where they do not apply or were refused."""
    global _done
    if _done is not None:
        return _done
    _done = False
    mode = os.environ.get("MELLUM2_MALLOC", "keep").strip().lower() or "keep"
    if mode not in ("keep", "default"):
        print(f"mellum2: MELLUM2_MALLOC={mode!r} is not 'keep' or 'default'; using 'keep'", file=sys.stderr)
    if mode == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            return False  # not glibc (musl has no mallopt tuning)
        ok = all(libc.mallopt(k, ctypes.c_int(v)) == 1 for k, v in (
            (_M_MMAP_THRESHOLD, _INT_MAX),  # serve large blocks from the heap ...
            (_M_TRIM_THRESHOLD, _INT_MAX),  # ... and do not hand them back on free
            (_M_TOP_PAD, 256 << 20),  # grow the heap in 256 MiB steps (virtual until touched)
        ))
    except OSError:
        return False
    _done = ok
    return ok
