"""`mellum2 tokenizer ...`: train, inspect and try the byte-level BPE.

    mellum2 tokenizer train --input PATH [PATH ...] --vocab-size N --out DIR
    mellum2 tokenizer info DIR
    mellum2 tokenizer encode DIR "some text" [--no-special]
    mellum2 tokenizer decode DIR 12 345 6

Inputs are anything `mellum2.data.sources` reads: files, directories, globs, *.jsonl, *.parquet,
hf:NAME, or `embedded` (the embedded default corpus), optionally prefixed with a domain (`code:src/`).
Documents over 1M characters are skipped and lines over 1,000 characters are trained on in pieces
(`mellum2 data prepare`'s limits), so training time stays bounded on pathological input. One document
in 50 (chosen by content hash) is held out of training and used to report bytes per
token per domain, so the figures are on text the tokenizer did not see.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

from mellum2.data.dedup import content_key
from mellum2.data.filters import FilterConfig, length_reason
from mellum2.data.sources import iter_source
from mellum2.errors import UsageError, run_stage

from .bpe import MIN_VOCAB, bytes_per_token, train_bpe
from .special import SPECIAL_TOKENS
from .tokenizer import Tokenizer, TokenizerError


def _vocab(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < MIN_VOCAB:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_VOCAB} (specials + 256 bytes), got {v}")
    return v


def _positive(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mellum2 tokenizer", description="Mellum 2's byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a tokenizer on files, directories or corpus sources")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories, globs, *.jsonl, *.parquet, hf:NAME or 'embedded' ([domain:] prefix)")
    t.add_argument("--vocab-size", type=_vocab, required=True, help="entries incl. 33 specials (98304 full, 8192 tiny)")
    t.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--max-mb", type=_positive, default=512.0, help="stop reading training text after this many MB")
    t.add_argument("--text-field", default="text", help="field of JSONL/Parquet rows holding the text")
    t.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("info", help="vocabulary size and the special-token table")
    i.add_argument("dir")
    e = sub.add_parser("encode", help="print the ids and tokens of a text")
    e.add_argument("dir")
    e.add_argument("text")
    e.add_argument("--no-special", action="store_true", help="encode special-token strings as plain text")
    d = sub.add_parser("decode", help="print the text of ids")
    d.add_argument("dir")
    d.add_argument("ids", nargs="+", type=int)
    return p


def bounded_pieces(text: str, max_len: int) -> Iterator[str]:
    """`text` cut so that no line is longer than `max_len` characters: BPE training time grows
    super-linearly with the length of a pre-token (one 400k-letter run: minutes), so an over-long line
    is trained on as `max_len`-character pieces (`mellum2 data prepare` drops code with such lines)."""
    if len(text) <= max_len or max(map(len, text.splitlines() or [""])) <= max_len:
        yield text
        return
    for line in text.splitlines(keepends=True):
        for i in range(0, len(line), max_len):
            yield line[i:i + max_len]


def train(args) -> int:
    held: dict[str, list[str]] = defaultdict(list)
    used, n_docs, skipped = Counter(), Counter(), Counter()
    cap = args.max_mb * (1 << 20)
    rules = FilterConfig()

    def texts():
        for spec in args.input:
            for doc in iter_source(spec, text_field=args.text_field, progress=not args.no_progress):
                n_docs[doc.domain] += 1
                if (reason := length_reason(doc, rules)) == "too_long":  # data prepare's rule and limit
                    skipped[reason] += 1
                    continue
                if content_key(doc.text)[0] % 50 == 0:
                    held[doc.domain].append(doc.text)
                    continue
                if sum(used.values()) >= cap:
                    return
                used[doc.domain] += len(doc.text.encode("utf-8", "replace"))
                yield from bounded_pieces(doc.text, rules.max_line_length)

    out = Path(args.out)
    if out.exists() and not out.is_dir():  # checked before training, which can take minutes
        raise UsageError(f"--out {out}: exists and is not a directory")
    t0 = time.time()
    try:  # a bad source is a SourceError naming it
        tok = train_bpe(texts(), args.vocab_size, args.min_frequency, show_progress=not args.no_progress)
    except TokenizerError:
        raise
    except ValueError as e:  # e.g. no text to train on
        raise TokenizerError(f"{e} (inputs: {args.input})") from None
    tok.save(args.out)  # atomic writes: a failure is a DiskError naming the file
    print(f"trained {tok.vocab_size} entries on {sum(used.values()) / 1e6:.1f} MB "
          f"({dict(n_docs)} documents) in {time.time() - t0:.1f} s -> {args.out}")
    if skipped:
        print(f"skipped {skipped['too_long']} document(s) over {rules.max_chars:,} characters (too_long, the rule of "
              f"`mellum2 data prepare`)")
    for dom, texts_ in sorted(held.items()):
        mb = sum(len(t.encode("utf-8", "replace")) for t in texts_) / 1e6
        print(f"held-out {dom}: {len(texts_)} documents, {mb:.2f} MB, {bytes_per_token(tok, texts_):.3f} bytes/token")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "train":
        return train(args)
    tok = Tokenizer.load(args.dir)
    if args.cmd == "info":
        print(f"{tok.source}: vocab_size {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}")
        for t in SPECIAL_TOKENS:
            print(f"  {t.id:>3}  {t.content:<20} {t.name}_id{'' if t.special else '   (special=false)'}")
    elif args.cmd == "encode":
        ids = tok.encode(args.text, allow_special=not args.no_special)
        print(ids)
        print([tok.id_to_token(i) for i in ids])
    elif args.cmd == "decode":
        try:
            print(tok.decode(args.ids))
        except ValueError as e:  # ids outside the vocabulary
            raise UsageError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("tokenizer", main))
