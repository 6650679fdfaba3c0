"""What every evaluation shares: loading a checkpoint with its tokenizer, a progress bar, a printed
table, the atomic JSON result, pass@k, and the held-out code the corpus never contains.

Held-out code: the embedded pre-training corpus is the interpreter's standard library with
site-packages excluded (mellum2/data/embedded.py), so the pure-Python sources of installed packages
are code the model has not seen. `heldout_files` takes them from a fixed list of packages that every
install of this project has (its own dependencies), in a seeded order, so two machines with the same
package versions score the same files.
"""
from __future__ import annotations

import math
import random
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from mellum2 import atomic
from mellum2.errors import NotFoundError, UsageError

# pure-Python packages installed with mellum2 (pyproject dependencies and their own), never in the corpus
HELDOUT_PACKAGES = ("pip", "jinja2", "tqdm", "markupsafe", "setuptools", "jsonschema", "safetensors")


def load(model_dir, tokenizer=None, dtype: str = "float32", mtp: bool = False):
    """(model, tokenizer) of a checkpoint or training run directory (eval mode, MTP head optional)."""
    from mellum2.locate import resolve_model_dir, tokenizer_dir
    from mellum2.model import load_pretrained
    from mellum2.tokenizer import Tokenizer

    mdir = resolve_model_dir(model_dir, "--model")
    model = load_pretrained(mdir, dtype=dtype, mtp=mtp).eval()
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


def heldout_files(n: int = 40, seed: int = 0, root: str | Path | None = None, min_bytes: int = 1000,
                  max_bytes: int = 20000, packages: Sequence[str] = HELDOUT_PACKAGES) -> list[Path]:
    """`n` Python files of held-out code (between min_bytes and max_bytes, UTF-8), in a seeded order.
    `root`: a directory of source files to take them from instead of the installed packages."""
    if root is not None:
        roots = [Path(root)]
        if not roots[0].is_dir():
            raise NotFoundError(f"{root}: no such directory of source files")
    else:
        roots = [purelib() / p for p in packages if (purelib() / p).is_dir()]
    files = []
    for r in roots:
        for p in sorted(r.rglob("*.py")):
            try:
                size = p.stat().st_size
                if min_bytes <= size <= max_bytes and p.is_file():
                    p.read_bytes().decode("utf-8")
                    files.append(p)
            except (OSError, UnicodeDecodeError):
                continue
    if not files:
        raise NotFoundError(f"no held-out .py files of {min_bytes}-{max_bytes} bytes under "
                            f"{', '.join(map(str, roots)) or 'the installed packages ' + ', '.join(packages)}")
    random.Random(seed).shuffle(files)
    return files[:n]
