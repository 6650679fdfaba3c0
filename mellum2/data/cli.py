"""`mellum2 data ...`: prepare, inspect, verify and sample the pre-training data.

    mellum2 data prepare                      # the embedded corpus -> $MELLUM2_CACHE/data/default
    mellum2 data prepare --sources code:src/ web:pages.jsonl math:hf:openai/gsm8k:main --out DIR
    mellum2 data info [DIR]                   # the summary tables of a prepared directory
    mellum2 data verify [DIR]                 # check every shard's checksum
    mellum2 data sample [DIR] --seq-len 256   # decode one packed row of the loader

`prepare` on a directory that is already complete only prints its summary (use --force to rebuild).
Errors (a bad source, a damaged directory, ...) reach the `mellum2` dispatcher, which prints one line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mellum2.errors import run_stage
from mellum2.locate import default_data_dir

from ..tokenizer import Tokenizer
from .loader import Loader
from .prepare import STATS, prepare, summary
from .shards import INDEX, ShardStore, verify


def _positive(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {s!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mellum2 data", description="Mellum 2 pre-training data pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="filter, dedup, decontaminate, tokenize and shard a corpus")
    pr.add_argument("--sources", nargs="+", default=["embedded"], metavar="SPEC",
                    help="[domain:]PATH|GLOB|FILE.jsonl|FILE.parquet, [domain:]hf:NAME[:CONFIG], or "
                         "embedded[:domain] (default: embedded)")
    pr.add_argument("--out", help="output directory (default: $MELLUM2_CACHE/data/default)")
    pr.add_argument("--tokenizer", help="a tokenizer directory to use instead of training one")
    pr.add_argument("--vocab-size", type=_positive(int), default=8192, help="when training a tokenizer")
    pr.add_argument("--tokenizer-train-mb", type=_positive(float), default=48.0)
    pr.add_argument("--scale", type=_positive(float), default=1.0, help="multiplies the embedded corpus caps")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--text-field", default="text", help="field of JSONL/Parquet/HF rows holding the text")
    pr.add_argument("--split", default="train", help="split of hf: sources")
    pr.add_argument("--budget", type=_positive(int), help="token budget for the curriculum table (default: corpus size)")
    pr.add_argument("--no-decontam", action="store_true", help="skip HumanEval decontamination")
    pr.add_argument("--no-near-dedup", action="store_true", help="skip MinHash near-dedup")
    pr.add_argument("--force", action="store_true", help="rebuild even if --out is already complete")
    pr.add_argument("--no-progress", action="store_true")
    for name, help_ in (("info", "print the summary of a prepared directory"),
                        ("verify", "check the checksum of every shard")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("dir", nargs="?", help="prepared directory (default: the default data dir)")
    sa = sub.add_parser("sample", help="decode one packed row as the loader yields it")
    sa.add_argument("dir", nargs="?")
    sa.add_argument("--seq-len", type=_positive(int), default=256)
    sa.add_argument("--phase", type=int, choices=(1, 2, 3), default=1)
    sa.add_argument("--seed", type=int, default=0)
    return p


def _dir(arg: str | None) -> Path:
    return Path(arg) if arg else default_data_dir()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        if args.vocab_size < 289:
            parser.error(f"--vocab-size must be >= 289 (33 specials + 256 bytes), got {args.vocab_size}")
        if args.out is None and args.sources != ["embedded"]:
            parser.error("--out is required with --sources (the default directory holds the embedded corpus)")
        out = _dir(args.out)
        if (out / INDEX).is_file() and not args.force:
            store = ShardStore(out)  # the cached directory must still be readable
            if store.index.get("sources") != args.sources:
                parser.error(f"--out {out} was prepared from {store.index.get('sources')}, not {args.sources}; "
                             "pass --force to rebuild it")
            print(summary(json.loads((out / STATS).read_text())))
            print(f"{out} is already prepared (--force rebuilds it)")
            return 0
        prepare(args.sources, out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seed=args.seed,
                scale=args.scale, decontaminate=not args.no_decontam, near_dedup=not args.no_near_dedup,
                text_field=args.text_field, split=args.split, tokenizer_train_mb=args.tokenizer_train_mb,
                budget=args.budget, progress=not args.no_progress)
    elif args.cmd == "info":
        d = _dir(args.dir)
        store = ShardStore(d)
        stats_file = d / STATS
        if stats_file.is_file():
            print(summary(json.loads(stats_file.read_text())))
        for dom in store.domains:
            print(f"{dom}: {store.n_docs(dom):,} documents, {int(store.doc_lens(dom).sum()):,} tokens")
    elif args.cmd == "verify":
        problems = verify(_dir(args.dir))
        for p in problems:
            print(p, file=sys.stderr)
        print("ok" if not problems else f"{len(problems)} corrupt shard(s)")
        return 1 if problems else 0
    elif args.cmd == "sample":
        return _sample(_dir(args.dir), args)
    return 0


def _sample(d: Path, args) -> int:
    total = 1_000_000
    loader = Loader(d, batch_size=1, seq_len=args.seq_len, total_tokens=total, seed=args.seed)
    loader.tokens_seen = loader.phase_boundaries[args.phase - 2] if args.phase > 1 else 0
    batch = next(loader)
    tok = Tokenizer.load(d / "tokenizer")
    ids, pos = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
    for a, b in zip(starts, starts[1:]):
        if set(ids[a:b]) == {tok.pad_id}:
            print(f"--- padding: {b - a} tokens ---")
            continue
        print(f"--- piece of {b - a} tokens (phase {args.phase}) ---")
        print(tok.decode(ids[a:b]))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("data", main))
