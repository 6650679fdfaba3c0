"""Bits per byte on held-out code, each file scored alone, next to `xz -9e` and `zstd -19` on the same
file alone.

The model's bits of a file are the sum over its tokens of -log2 p(token | the tokens before it), the
first conditioned on `<|endoftext|>` only (a document start, as in training), divided by the file's
UTF-8 bytes: a tokenizer-independent figure that a compressor's output size (8 x compressed bytes /
raw bytes) can stand next to. Files longer than the model's context are scored with a sliding window
(each token once, with at least half a window of context). The compressors see exactly the same bytes:
`lzma.compress(preset=9 | PRESET_EXTREME)` is `xz -9e` (same .xz container, CRC64 check), zstd is
the `zstd` binary at level 19 (or the `zstandard` module when installed). The aggregate is the
byte-weighted one (total bits / total bytes), as a compressor of the concatenation would be judged.
"""
from __future__ import annotations

import lzma
import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .common import heldout_files, progress


def xz_bits(data: bytes) -> int:
    return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def zstd_backend() -> str | None:
    """"zstandard" (the module), "zstd" (the binary) or None (neither: zstd figures are left out)."""
    try:
        import zstandard  # noqa: F401 - optional
        return "zstandard"
    except ImportError:
        return "zstd" if shutil.which("zstd") else None


def zstd_bits(data: bytes, level: int = 19) -> int | None:
    kind = zstd_backend()
    if kind == "zstandard":
        import zstandard  # optional dependency, checked above
        return 8 * len(zstandard.ZstdCompressor(level=level).compress(data))
    if kind == "zstd":
        out = subprocess.run(["zstd", f"-{level}", "-c", "-q", "--no-progress"], input=data,
                             capture_output=True, check=True).stdout
        return 8 * len(out)
    return None


@torch.no_grad()
def model_bits(model, ids: Sequence[int], window: int | None = None, stride: int | None = None) -> float:
    """Sum of -log2 p over ids[1:] given what precedes each (ids[0] is the document start), in windows
    of `window` tokens (default: the model's context) advancing by `stride` (default: half a window)."""
    W = min(window or model.cfg.max_position_embeddings, model.cfg.max_position_embeddings)
    stride = stride or max(1, W // 2)
    if not 1 <= stride <= W:
        raise ValueError(f"bpb: stride {stride} must be in 1..window ({W})")
    x = torch.tensor(ids, device=model.lm_head.weight.device)
    L = len(ids)
    nats, done, begin = 0.0, 1, 0  # done: index of the first target not yet scored
    while done < L:
        end = min(begin + W, L)
        h, _ = model.trunk(x[None, begin:end])
        logits = model.head(h[:, done - 1 - begin:end - 1 - begin]).float()[0]
        nats += F.cross_entropy(logits, x[done:end], reduction="sum").item()
        done, begin = end, begin + stride  # the next window overlaps this one by W - stride
    return nats / math.log(2)


def score_files(model, tok, files: Sequence[Path], window: int | None = None, stride: int | None = None,
                quiet: bool = False, workers: int = 2) -> list[dict]:
    """Per file: bytes, tokens, the model's bits, xz's and zstd's. Compressors run in threads while
    the model scores (lzma and subprocess release the GIL)."""
    datas = [Path(f).read_bytes() for f in files]
    with ThreadPoolExecutor(workers) as pool:
        xz = [pool.submit(xz_bits, d) for d in datas]
        zs = [pool.submit(zstd_bits, d) for d in datas]
        rows = []
        for f, d in progress(list(zip(files, datas)), "bpb", quiet=quiet):
            ids = [tok.bos_id] + list(tok.encode(d.decode("utf-8"), allow_special=False))
            rows.append({"file": str(f), "bytes": len(d), "tokens": len(ids) - 1,
                         "model_bits": model_bits(model, ids, window, stride)})
        for r, a, b in zip(rows, xz, zs):
            r["xz_bits"], r["zstd_bits"] = a.result(), b.result()
    for r in rows:
        for k in ("model", "xz", "zstd"):
            r[f"{k}_bpb"] = r[f"{k}_bits"] / r["bytes"] if r[f"{k}_bits"] is not None else None
    return rows


def summarize(rows: list[dict]) -> dict:
    nbytes = sum(r["bytes"] for r in rows)
    out = {"files": len(rows), "bytes": nbytes, "tokens": sum(r["tokens"] for r in rows)}
    for k in ("model", "xz", "zstd"):
        bits = [r[f"{k}_bits"] for r in rows]
        out[f"{k}_bpb"] = sum(bits) / nbytes if nbytes and None not in bits else None
    out["bytes_per_token"] = nbytes / out["tokens"] if out["tokens"] else 0.0
    out["zstd_backend"] = zstd_backend()
    return out


def run(model, tok, n: int = 40, seed: int = 0, root=None, files=None, max_bytes: int = 24576,
        window: int | None = None, stride: int | None = None, quiet: bool = False) -> dict:
    """Held-out bits per byte: {"summary": {model_bpb, xz_bpb, zstd_bpb, files, bytes, tokens, ...},
    "rows": per file}. `files` overrides the held-out selection (common.heldout_files)."""
    files = list(files) if files is not None else heldout_files(n, seed, root, max_bytes=max_bytes)
    was = model.training
    model.eval()
    try:
        rows = score_files(model, tok, files, window, stride, quiet)
    finally:
        model.train(was)
    return {"summary": summarize(rows), "rows": rows}


def summary_rows(res: dict) -> list[dict]:
    s = res["summary"]
    return [{"scorer": name, "bits/byte": s[f"{k}_bpb"]} for name, k in
            (("model", "model"), ("xz -9e", "xz"), (f"zstd -19 ({s['zstd_backend'] or 'not available'})", "zstd"))]
