"""`mellum2 serve --model DIR`: the OpenAI-compatible server (docs/serve.md).

    mellum2 serve --model runs/sft [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-num-seqs N]
                  [--max-model-len N] [--speculative] [--draft-tokens K] [--compile]

Binds to 127.0.0.1 unless --host says otherwise (the server has no TLS; put it behind a proxy to
expose it). The model name clients pass is --served-model-name (default: the model directory's
name). The tokenizer and the MTP draft vocabulary are found next to the model, as for `mellum2 chat`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import uvicorn

from mellum2.errors import UsageError
from mellum2.locate import draft_vocab as load_draft_vocab
from mellum2.locate import resolve_model_dir, tokenizer_dir
from mellum2.model import load_pretrained
from mellum2.tokenizer import Tokenizer

from .app import build_app
from .engine_process import EngineProcessError, ProcessEngine
from .server import make_state

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mellum2 serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="serve a checkpoint over an OpenAI-compatible HTTP API")
    a = p.add_argument
    a("--model", required=True, help="checkpoint directory or training run directory")
    a("--tokenizer", default=None, help="tokenizer directory (default: found next to the model)")
    a("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    a("--port", type=int, default=8000)
    a("--api-key", default=os.environ.get("MELLUM2_API_KEY"),
      help="require `Authorization: Bearer KEY` on /v1/* (default: $MELLUM2_API_KEY, else none)")
    a("--served-model-name", default=None, help="the model name clients pass (default: the directory's name)")
    a("--max-num-seqs", type=int, default=8, help="requests decoded together")
    a("--max-waiting", type=int, default=64, help="requests queued beyond the running ones (then 503)")
    a("--max-model-len", type=int, default=None, help="prompt + completion tokens (default: the model's context)")
    a("--speculative", action="store_true", help="MTP self-speculative decoding (the checkpoint needs an MTP head)")
    a("--draft-tokens", type=int, default=1, help="drafts per step with --speculative")
    a("--compile", action="store_true", help="torch.compile the decode steps")
    a("--prefill-chunk", type=int, default=256,
      help="prompt tokens prefilled per engine step, all new requests together (bounds the stall of running "
           "streams)")
    a("--prefix-cache-tokens", type=int, default=None,
      help="prompt tokens the prefix cache may hold (default: 4 full contexts; 0: off)")
    a("--batching", choices=["continuous", "static"], default="continuous",
      help="static: batches run to their end before the next starts (for comparison; continuous needs the "
           "scheduling engine)")
    a("--engine", choices=["process", "thread"], default="process",
      help="process: the engine runs in a child process, so the HTTP side and the engine do not share one "
           "interpreter lock; thread: in this process (always so with --batching static)")
    a("--dtype", choices=sorted(DTYPES), default="fp32")
    a("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, v, lo in (("--port", args.port, 0), ("--max-num-seqs", args.max_num_seqs, 1),
                        ("--prefix-cache-tokens", args.prefix_cache_tokens or 0, 0),
                        ("--prefill-chunk", args.prefill_chunk, 1),
                        ("--max-waiting", args.max_waiting, 0), ("--draft-tokens", args.draft_tokens, 1)):
        if v < lo:
            raise UsageError(f"{flag}: expected an int >= {lo}, got {v}")
    if args.threads:
        torch.set_num_threads(args.threads)
    mdir = resolve_model_dir(args.model, flag="--model")
    tdir = tokenizer_dir(mdir, args.tokenizer)
    tok = Tokenizer.load(tdir)
    options = dict(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, speculative=args.speculative,
                   draft_tokens=args.draft_tokens, compile=args.compile,
                   prefix_cache_tokens=args.prefix_cache_tokens, prefill_chunk=args.prefill_chunk)
    engine = None
    if args.engine == "process" and args.batching != "static":
        try:
            engine = ProcessEngine(mdir, DTYPES[args.dtype], tdir, options, threads=args.threads)
        except EngineProcessError as e:
            raise UsageError(f"--model {args.model}: {e}") from None
        model = engine.model_stub()
        draft = None
    else:
        model = load_pretrained(mdir, dtype=DTYPES[args.dtype])
        draft = load_draft_vocab(mdir) if model.mtp is not None else None
    if args.speculative and model.mtp is None:
        print("mellum2 serve: this checkpoint has no MTP head: --speculative is off", file=sys.stderr)
    name = args.served_model_name or (Path(args.model).resolve().name)
    try:
        state = make_state(model, tok, name=name, api_key=args.api_key, max_waiting=args.max_waiting,
                           mode="static" if args.batching == "static" else "auto", draft_vocab=draft, engine=engine,
                           **options)
    except ValueError as e:
        if engine is not None:
            engine.close()
        raise UsageError(f"--model {args.model}: {e}") from None
    print(f"mellum2 serve: {name} ({state.backend.mode} batching, max {args.max_num_seqs} sequences, context "
          f"{state.max_model_len}{', MTP speculative' if state.backend.speculative else ''}) on "
          f"http://{args.host}:{args.port}", file=sys.stderr)
    try:
        uvicorn.run(build_app(state), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        state.backend.close()
        if engine is not None:
            engine.close()
    return 0


if __name__ == "__main__":
    from mellum2.errors import run_stage
    sys.exit(run_stage("serve", main))
