"""Repository code completion on held-out code: the IDE use case. Given a file cut at the start of a
line, complete that line, either left to right (the code above only) or fill-in-the-middle (the code
above and below); exact match and edit similarity, by context length.

Tasks: from held-out files (common.heldout_files: installed packages' sources, which the corpus
excludes) `lines_per_file` target lines each, chosen with a seed among lines that hold code (not blank,
not only a comment or a closing bracket, at least 4 characters). The prefix ends with the newline
before the target line (so the model writes the indentation too: no cut inside a token), the FIM
suffix starts at the line after it. The completion is the model's first line.

Metrics (as CodeXGLUE line completion / RepoBench / CrossCodeEval report them): exact match of the
line with trailing whitespace dropped, and edit similarity 1 - Levenshtein(pred, truth) / max(len),
averaged. Context length: the prompt keeps at most C tokens around the cursor (prefix end, suffix
start) for each C asked for, so the table shows how much the model gains from more of the file.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from . import gen
from .common import heldout_files


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute: 1 each), two rows at a time."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(pred: str, truth: str) -> float:
    if not pred and not truth:
        return 1.0
    return 1.0 - levenshtein(pred, truth) / max(len(pred), len(truth))


def _is_target(line: str) -> bool:
    s = line.strip()
    return len(s) >= 4 and not s.startswith("#") and s not in (")", "]", "}", "):", "],", "},", '"""', "'''")


def tasks(files: Sequence[Path], lines_per_file: int = 2, seed: int = 0, min_prefix_lines: int = 3) -> list[dict]:
    """{"file", "line", "prefix", "truth", "suffix"} per target line."""
    out = []
    for f in files:
        lines = Path(f).read_text(encoding="utf-8").splitlines(keepends=True)
        cand = [i for i in range(min_prefix_lines, len(lines)) if _is_target(lines[i])]
        rng = random.Random(f"{seed}:{Path(f).name}:{len(lines)}")
        for i in sorted(rng.sample(cand, min(lines_per_file, len(cand)))):
            out.append({"file": str(f), "line": i + 1, "prefix": "".join(lines[:i]),
                        "truth": lines[i].rstrip("\n"), "suffix": "".join(lines[i + 1:])})
    return out


def score(ts: Sequence[dict], preds: Sequence[str]) -> dict:
    preds = [p.split("\n", 1)[0].rstrip() for p in preds]
    em = [p == t["truth"].rstrip() for p, t in zip(preds, ts)]
    es = [edit_similarity(p, t["truth"].rstrip()) for p, t in zip(preds, ts)]
    n = max(1, len(ts))
    return {"tasks": len(ts), "exact_match": sum(em) / n, "edit_similarity": sum(es) / n, "preds": preds}


def run(model, tok, n_files: int = 20, lines_per_file: int = 2, contexts: Sequence[int] = (128, 512),
        modes: Sequence[str] = ("fim", "ltr"), seed: int = 0, root=None, files=None, max_new_tokens: int = 48,
        quiet: bool = False) -> dict:
    """EM / ES per (mode, context length): {"rows": [...], "tasks": [...]}."""
    files = list(files) if files is not None else heldout_files(n_files, seed, root)
    ts = tasks(files, lines_per_file, seed)
    limit = model.cfg.max_position_embeddings - max_new_tokens - 4
    rows, preds = [], {}
    for ctx in contexts:
        c = min(ctx, limit)
        for mode in modes:
            if mode == "fim":
                out = gen.fim(model, tok, [(t["prefix"], t["suffix"]) for t in ts], c, max_new_tokens,
                              stops=("\n",), quiet=quiet, desc=f"completion fim@{c}")
            elif mode == "ltr":
                out = gen.left_to_right(model, tok, [t["prefix"] for t in ts], c, max_new_tokens, stops=("\n",),
                                        quiet=quiet, desc=f"completion ltr@{c}")
            else:
                raise ValueError(f"completion mode {mode!r}: expected 'fim' or 'ltr'")
            s = score(ts, out)
            preds[f"{mode}@{c}"] = s.pop("preds")
            rows.append({"mode": mode, "context": c, **s})
    return {"rows": rows, "files": len(files),
            "tasks": [{k: t[k] for k in ("file", "line", "truth")} for t in ts], "preds": preds}
