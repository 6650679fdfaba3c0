"""Bits per byte on held-out Python files, next to `xz -9e` on each file alone.

    python benchmarks/heldout_bpb.py --model runs/demo                 # 40 files, window 1024, stride 512
    python benchmarks/heldout_bpb.py --model runs/demo --files 12      # the quick set the tuning runs use

Held-out bytes: `.py` files of the installed packages (the interpreter's `purelib`, i.e. site-packages),
which the embedded corpus never reads (it takes the standard library with site-packages excluded).
The files are chosen reproducibly: sizes 2-24 KB, ordered by a hash of the path relative to the root,
at most one file per top-level package so no single package dominates, the first `--files` of them.
The set depends on what is installed; the JSON line lists the files.

Each file is scored alone (no context from other files): `<|endoftext|>` then the file's tokens, in
windows of `--window` tokens advancing by `--stride` (every token after the first window is predicted
with at least window - stride tokens of context); the model's bits are the summed cross-entropy of
every file token, in bits, over the file's UTF-8 bytes. The peer is `lzma` with preset 9 | EXTREME
(what `xz -9e` writes, container and all) on each file alone. Totals are over all bytes of the set
(a byte-weighted mean). Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mellum2.infer.api import as_model
from mellum2.locate import resolve_model_dir, tokenizer_dir
from mellum2.tokenizer import Tokenizer


def heldout_files(root: Path, n: int, lo: int = 2048, hi: int = 24576) -> list[Path]:
    """n .py files under root: lo..hi bytes, in hash order of their relative path, one per package."""
    cands = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if "mellum2" in rel or "/tests/" in f"/{rel}" or not p.is_file():
            continue
        try:
            size = p.stat().st_size
        except OSError:
            continue
        if lo <= size <= hi:
            cands.append((hashlib.sha1(rel.encode()).hexdigest(), rel, p))
    out, seen = [], set()
    for _, rel, p in sorted(cands):
        pkg = rel.split("/", 1)[0]
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
    return out


@torch.no_grad()
def file_bits(model, ids: list[int], window: int, stride: int) -> float:
    """Summed cross-entropy (bits) of ids[1:] given the tokens before each, in strided windows."""
    x = torch.tensor(ids)
    total_nats, scored = 0.0, 1  # ids[0] is the <|endoftext|> the file starts after: not scored
    start = 0
    while scored < len(ids):
        end = min(len(ids), start + window)
        h, _ = model.trunk(x[None, start:end])
        logits = model.head(h)[0].float()  # [T, V]
        tgt = x[start + 1:end]
        nll = F.cross_entropy(logits[:-1], tgt, reduction="none")
        first = scored - (start + 1)  # tokens already scored by the previous window
        total_nats += nll[first:].sum().item()
        scored = end
        start = min(start + stride, end - 1)  # the next target's predecessor must be in the window
    return total_nats / math.log(2)


def xz_bits(data: bytes) -> int:
    return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def measure(model_dir: str, files: list[Path], window: int, stride: int, root: Path) -> dict:
    tok = Tokenizer.load(tokenizer_dir(resolve_model_dir(model_dir)))
    model = as_model(model_dir).float().eval()
    window = min(window, model.cfg.max_position_embeddings)
    rows, t0 = [], time.perf_counter()
    for p in files:
        text = p.read_text(encoding="utf-8")
        data = text.encode("utf-8")
        ids = [tok.bos_id] + list(tok.encode(text, allow_special=False))
        rows.append({"file": p.relative_to(root).as_posix(), "bytes": len(data), "tokens": len(ids) - 1,
                     "model_bits": file_bits(model, ids, window, stride), "xz_bits": xz_bits(data)})
    n_bytes = sum(r["bytes"] for r in rows)
    bpb = sum(r["model_bits"] for r in rows) / n_bytes
    xz = sum(r["xz_bits"] for r in rows) / n_bytes
    wins = sum(r["model_bits"] < r["xz_bits"] for r in rows)
    return {"model": str(model_dir), "files": len(rows), "bytes": n_bytes,
            "bytes_per_token": n_bytes / sum(r["tokens"] for r in rows), "bpb": bpb, "xz_bpb": xz,
            "ratio_xz_over_model": xz / bpb, "files_model_beats_xz": wins, "window": window, "stride": stride,
            "seconds": time.perf_counter() - t0, "per_file": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint or training run directory")
    ap.add_argument("--config", default=None, help="a JSON file with any of the options below (flags win)")
    ap.add_argument("--files", type=int, default=None, help="how many held-out files (default 40)")
    ap.add_argument("--root", default=None, help="directory of held-out .py files (default: site-packages)")
    ap.add_argument("--window", type=int, default=None, help="tokens per forward (default 1024)")
    ap.add_argument("--stride", type=int, default=None, help="tokens a window advances (default 512)")
    ap.add_argument("--quiet", action="store_true", help="only the JSON line")
    a = ap.parse_args(argv)
    conf = {"files": 40, "root": sysconfig.get_paths()["purelib"], "window": 1024, "stride": 512}
    if a.config:
        conf.update(json.loads(Path(a.config).read_text()))
    conf.update({k: v for k, v in vars(a).items() if k in conf and v is not None})
    if conf["stride"] < 1 or conf["stride"] > conf["window"]:
        sys.exit(f"--stride {conf['stride']}: expected 1..window ({conf['window']})")
    root = Path(conf["root"])
    files = heldout_files(root, conf["files"])
    if not files:
        sys.exit(f"--root {root}: no .py files of 2-24 KB there")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = measure(a.model, files, conf["window"], conf["stride"], root)
    if not a.quiet:
        for r in res["per_file"]:
            print(f"{r['file'][:60]:60s} {r['bytes']:7,d} B  model {r['model_bits'] / r['bytes']:.3f}  "
                  f"xz -9e {r['xz_bits'] / r['bytes']:.3f} bits/byte")
        print(f"{res['files']} files, {res['bytes']:,} bytes ({res['bytes_per_token']:.2f} bytes/token): model "
              f"{res['bpb']:.3f} bits/byte, xz -9e {res['xz_bpb']:.3f}; xz/model {res['ratio_xz_over_model']:.3f}; "
              f"model beats xz on {res['files_model_beats_xz']}/{res['files']} files ({res['seconds']:.0f} s)")
    print(json.dumps({k: v for k, v in res.items() if k != "per_file"} | {"file_list": [r["file"] for r in res["per_file"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
