"""`mellum2 eval <task>`: evaluations of a checkpoint.

  passkey          retrieval of a number hidden at several depths, at several lengths
  ppl-by-position  perplexity in position buckets on long held-out repository-level code
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mellum2 import atomic
from mellum2.errors import UsageError, run_stage
from mellum2.locate import resolve_model_dir, tokenizer_dir
from mellum2.model import load_pretrained
from mellum2.tokenizer import Tokenizer

from . import longdata, passkey, ppl


def load_tokenizer(model_dir: str | None, tokenizer: str | None) -> Tokenizer:
    """`tokenizer` (a directory) when given, else the one found next to the checkpoint or run
    (mellum2.locate.tokenizer_dir), else the default corpus's."""
    return Tokenizer.load(tokenizer_dir(resolve_model_dir(model_dir) if model_dir else None, tokenizer))


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v or min(v) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return v


def _fracs(s: str) -> list[float]:
    try:
        v = [float(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {s!r}") from None
    if not v or min(v) < 0 or max(v) > 1:
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {s!r}")
    return v


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mellum2 eval", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="task", required=True)
    for name in ("passkey", "ppl-by-position"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="checkpoint directory or training run directory")
        p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's, else the corpus's)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        p.add_argument("--json", help="also write the results to this file")
    p = sub.choices["passkey"]
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096], help="prompt lengths in tokens")
    p.add_argument("--depths", type=_fracs, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=5, help="samples per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.choices["ppl-by-position"]
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--n", type=int, default=4, help="number of sequences")
    p.add_argument("--source", help="directory of source files (default: the interpreter's pip package)")
    p.add_argument("--first-bucket", type=int, default=256)
    return ap


def _check_args(a) -> None:
    """Refuse what would fail only after the model ran: nothing to evaluate, an unwritable --json."""
    for name in (("samples",) if a.task == "passkey" else ("n", "length", "first_bucket")):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(a, name)}")
    if a.json:
        p = Path(a.json)
        if p.is_dir():
            raise UsageError(f"--json {p}: is a directory (expected a file name)")
        if not p.resolve().parent.is_dir():
            raise UsageError(f"--json {p}: the directory {p.resolve().parent} does not exist")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    _check_args(a)
    mdir = resolve_model_dir(a.model, "--model")
    model = load_pretrained(mdir, dtype=a.dtype, mtp=False)
    tok = Tokenizer.load(tokenizer_dir(mdir, a.tokenizer))
    torch.manual_seed(0)
    if a.task == "passkey":
        def show(L, d, acc):
            print(f"  length {L:>6} depth {d:.2f}: {acc:.2f}", file=sys.stderr)

        res = passkey.run(model, tok, a.lengths, a.depths, a.samples, a.seed, progress=show)
        print(f"passkey accuracy ({a.samples} samples per cell, native context "
              f"{model.cfg.rope_parameters['full_attention'].get('original_max_position_embeddings', model.cfg.max_position_embeddings)}):")
        for L, acc in res["by_length"].items():
            print(f"  {L:>6} tokens: {acc:.2f}   digit accuracy {res['token_acc_by_length'][L]:.2f}, "
                  f"digit nll {res['nll_by_length'][L]:.2f}")
    else:
        seqs = longdata.repo_sequences(tok, a.length, a.n, a.source)
        nll = ppl.nll_by_position(model, seqs)
        res = {"buckets": ppl.bucketed(nll, ppl.buckets_for(a.length, a.first_bucket)), "n": len(seqs)}
        print(f"perplexity by position ({len(seqs)} sequences of {a.length} tokens):")
        for r in res["buckets"]:
            print(f"  [{r['from']:>6}, {r['to']:>6}): nll {r['nll']:.3f}  ppl {r['ppl']:.2f}")
    if a.json:
        atomic.write_text(a.json, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("eval", main))
