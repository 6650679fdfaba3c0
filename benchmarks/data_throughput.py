"""Data pipeline throughput on this machine: tokenizer MB/s, end-to-end `prepare` MB/s, and the
loader's batches/s against what a `tiny` training step consumes (the loader must never be the
bottleneck).

    .venv/bin/python benchmarks/data_throughput.py [--scale 0.25] [--steps 5] [--out DIR]

Peers: our `Tokenizer.encode_batch` (the Rust `tokenizers` engine on all cores) vs the same engine one
document at a time vs `transformers.AutoTokenizer` on the saved directory (same engine, Python-side
overhead). The prepare run builds the embedded corpus at `--scale` (1.0 = the ~55 MB default) into a
temporary directory, training an 8192 tokenizer on the way. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mellum2.data.loader import Loader  # noqa: E402
from mellum2.data.prepare import prepare  # noqa: E402
from mellum2.data.shards import ShardStore  # noqa: E402
from mellum2.tokenizer import Tokenizer  # noqa: E402


def corpus_texts(store: ShardStore, tok: Tokenizer, mb: float) -> list[str]:
    """About `mb` MB of stored documents (decoded back to text), spread over the domains."""
    texts, per = [], mb * 1e6 / len(store.domains)
    for d in store.domains:
        n = 0
        for i in range(store.n_docs(d)):
            t = tok.decode(store.doc(d, i).tolist())
            texts.append(t)
            n += len(t.encode())
            if n >= per:
                break
    return texts


def bench_tokenizer(tok: Tokenizer, tok_dir: Path, texts: list[str]) -> dict:
    mb = sum(len(t.encode()) for t in texts) / 1e6
    out = {"mb": mb}
    t = time.perf_counter()
    n_tok = sum(map(len, tok.encode_batch(texts, allow_special=False)))
    out["ours_batch_mb_s"] = mb / (time.perf_counter() - t)
    t = time.perf_counter()
    for s in texts:
        tok.encode(s, allow_special=False)
    out["ours_sequential_mb_s"] = mb / (time.perf_counter() - t)
    try:
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(str(tok_dir))
        t = time.perf_counter()
        hf(texts, add_special_tokens=False)
        out["transformers_batch_mb_s"] = mb / (time.perf_counter() - t)
    except ImportError:
        pass
    out["bytes_per_token"] = mb * 1e6 / n_tok
    return out


def bench_loader(data_dir: Path, batch_size: int, seq_len: int, n: int = 200) -> float:
    loader = Loader(data_dir, batch_size, seq_len, total_tokens=10**12, max_repeats=10**6)
    next(loader)
    t = time.perf_counter()
    for _ in range(n):
        next(loader)
    return n / (time.perf_counter() - t)


def bench_train_step(data_dir: Path, steps: int) -> float:
    from mellum2 import Mellum2, ModelConfig
    torch.manual_seed(0)
    model = Mellum2(ModelConfig.from_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = Loader(data_dir, 8, 512, total_tokens=10**12, max_repeats=10**6)
    times = []
    for _ in range(steps + 1):
        b = next(loader)
        t = time.perf_counter()
        out = model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[steps // 2]  # median; the first step pays one-time costs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=0.25, help="embedded corpus scale for the prepare run")
    p.add_argument("--steps", type=int, default=5, help="tiny training steps to time")
    p.add_argument("--out", help="keep the prepared directory here (default: a temporary one)")
    args = p.parse_args(argv)
    res = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "data"
        t = time.perf_counter()
        stats = prepare(["embedded"], out, scale=args.scale, progress=False, log=lambda s: None)
        wall = time.perf_counter() - t
        mb_in = sum(d["mb_in"] for d in stats["domains"].values())
        res["prepare"] = {"scale": args.scale, "mb_in": round(mb_in, 2), "seconds": round(wall, 1),
                          "mb_s": round(mb_in / wall, 3), "tokens": sum(d["tokens"] for d in stats["domains"].values()),
                          "stage_seconds": {k: round(v, 1) for k, v in stats["timing"].items()},
                          "heldout_bytes_per_token": {k: round(v, 3) for k, v in stats["heldout_bytes_per_token"].items()},
                          "split_rate_8192": {k: round(v, 4) for k, v in stats["packing"]["8192"].items()}}
        print(f"prepare: {mb_in:.1f} MB in {wall:.1f} s = {mb_in / wall:.2f} MB/s "
              f"(filter+dedup {stats['timing']['filter_dedup_s']:.1f} s, tokenizer training "
              f"{stats['timing']['tokenizer_s']:.1f} s, tokenize+write {stats['timing']['tokenize_write_s']:.1f} s)")
        store = ShardStore(out)
        tok = Tokenizer.load(out / "tokenizer")
        tk = bench_tokenizer(tok, out / "tokenizer", corpus_texts(store, tok, 8.0))
        res["tokenizer"] = {k: round(v, 3) for k, v in tk.items()}
        print("tokenizer MB/s: " + ", ".join(f"{k} {v:.2f}" for k, v in tk.items()))
        lb = bench_loader(out, 8, 512)
        lb_long = bench_loader(out, 1, 8192, n=50)
        step_s = bench_train_step(out, args.steps)
        res["loader"] = {"batches_s_8x512": round(lb, 1), "batches_s_1x8192": round(lb_long, 1),
                         "tokens_s_8x512": round(lb * 8 * 512)}
        res["tiny_train_step"] = {"seconds": round(step_s, 3), "steps_s": round(1 / step_s, 3)}
        res["loader_headroom"] = round(lb * step_s, 1)
        print(f"loader: {lb:.0f} batches/s of 8x512 ({lb * 4096 / 1e6:.2f} M tokens/s), {lb_long:.0f}/s of 1x8192; "
              f"tiny train step {step_s:.2f} s -> the loader is {lb * step_s:.0f}x faster than training needs")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
