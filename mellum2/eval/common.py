"""What every evaluation shares: loading a checkpoint with its tokenizer, a progress bar, a printed
table, the atomic JSON result, pass@k, and the held-out code the corpus never contains.

Held-out code: the embedded pre-training corpus is the interpreter's standard library with
site-packages excluded (mellum2/data/embedded.py), so the pure-Python sources of installed packages
are code the model has not seen. `heldout_files` picks them reproducibly (hash order of the path, one
file per package), so two machines with the same packages installed score the same files.
"""
from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from mellum2 import atomic
from mellum2.errors import NotFoundError, UsageError


def load(model_dir, tokenizer=None, dtype: str = "float32", mtp: bool = False, device: str | None = None):
    """(model, tokenizer) of a checkpoint or training run directory (eval mode, MTP head optional),
    on `device` (default: the CPU)."""
    from mellum2.locate import resolve_model_dir, tokenizer_dir
    from mellum2.model import load_pretrained
    from mellum2.tokenizer import Tokenizer

    mdir = resolve_model_dir(model_dir, "--model")
    model = load_pretrained(mdir, dtype=dtype, mtp=mtp).eval()
    if device:
        model.to(device)
    return model, Tokenizer.load(tokenizer_dir(mdir, tokenizer))


def progress(it: Iterable, desc: str, total: int | None = None, quiet: bool = False):
    """A progress bar on stderr (hidden when quiet)."""
    return tqdm(it, desc=desc, total=total, disable=quiet, file=sys.stderr, leave=False, dynamic_ncols=True)


def table(rows: Sequence[dict], cols: Sequence[str] | None = None, floatfmt: str = ".3f") -> str:
    """A plain-text (also valid Markdown) table of dicts; columns in first-seen order."""
    if not rows:
        return "(no rows)"
    cols = list(cols or dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt) if math.isfinite(v) else str(v)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    w = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w[i]) for i, v in enumerate(vals)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in cells])


def write_json(path, result: dict) -> None:
    if path:
        atomic.write_json(path, result)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. 2021: 1 - C(n-c, k) / C(n, k), computed as a
    product so large n does not overflow; n samples of which c passed."""
    if k > n:
        raise UsageError(f"pass@{k} needs at least {k} samples per task, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def purelib() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def heldout_files(n: int = 40, seed: int = 0, root: str | Path | None = None, min_bytes: int = 2048,
                  max_bytes: int = 24576) -> list[Path]:
    """`n` held-out Python files: `.py` files of min_bytes..max_bytes (UTF-8) under `root` (default: the
    interpreter's site-packages, which the corpus never reads), ordered by a hash of their path relative
    to root (salted by `seed` when it is not 0), at most one per top-level package so that no package
    dominates; mellum2 itself and test directories are skipped. The set depends on what is installed."""
    root = Path(root) if root is not None else purelib()
    if not root.is_dir():
        raise NotFoundError(f"{root}: no such directory of source files")
    cands = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if "mellum2" in rel or "/tests/" in f"/{rel}" or not p.is_file():
            continue
        try:
            size = p.stat().st_size
        except OSError:
            continue
        if min_bytes <= size <= max_bytes:
            key = rel if seed == 0 else f"{seed}:{rel}"
            cands.append((hashlib.sha1(key.encode()).hexdigest(), rel, p))
    out, seen = [], set()
    for _, rel, p in sorted(cands):
        pkg = rel.split("/", 1)[0] if "/" in rel else rel
        if pkg in seen:
            continue
        try:
            p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        seen.add(pkg)
        out.append(p)
        if len(out) == n:
            break
    if not out:
        raise NotFoundError(f"{root}: no .py files of {min_bytes}-{max_bytes} bytes there")
    return out
