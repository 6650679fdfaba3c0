"""`mellum2 generate` and `mellum2 complete`: stream a completion to the terminal.

    mellum2 generate --model runs/tiny --prompt "def fibonacci(n):" [--speculative] [--temperature 0.8 ...]
    mellum2 complete --model runs/tiny --prefix "def add(a, b):\\n    " --suffix "\\n\\nprint(add(1, 2))"

--model is a checkpoint directory (config.json + safetensors) or a training run directory (its newest
checkpoint's model/ is used). The tokenizer is looked up next to the model, then in the run and in
the default data directory (`--tokenizer DIR` to choose; mellum2/locate.py). The text streams to
stdout as tokens come (held back while a multi-byte character is incomplete); the last line, on stderr, gives tokens/s
and, with --speculative, the acceptance rate. The dispatcher (mellum2/cli.py) passes the sub-command
as argv[0]; errors reach it and are printed as one line (mellum2/errors.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from mellum2.errors import MellumError, describe_os_error, run_stage
from mellum2.locate import draft_vocab as load_draft_vocab
from mellum2.locate import resolve_model_dir, tokenizer_dir
from mellum2.model import load_pretrained
from mellum2.tokenizer import Tokenizer

from .api import make_params
from .engine import Engine
from .fim import fim_prompt, fim_stop_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class CliError(MellumError):
    """A bad prompt or sampling option of `mellum2 generate` / `complete`."""


# drafts per speculative step: the one MTP head is reused for each, so acceptance falls quickly with
# depth; beyond this a step costs more than it can save (and drafts would run past short contexts)
MAX_DRAFT_TOKENS = 8


def _int(s: str) -> int:
    """An integer, also written as 1e9 (as long as it is whole)."""
    try:
        v = float(s)
        if v != int(v):
            raise ValueError
        return int(v)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def utf8_text(text: str, flag: str) -> str:
    """`text` as given on the command line, refused when it holds bytes that are not UTF-8 (Python
    keeps them as lone surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise CliError(f"{flag}: not valid UTF-8 (byte 0x{bad.hex()} at character {e.start})") from None
    return text


def resolve_tokenizer(arg: str | None, model_dir: Path) -> Tokenizer:
    """`--tokenizer DIR` when given, else the tokenizer found next to the model (mellum2.locate)."""
    return Tokenizer.load(tokenizer_dir(model_dir, arg))


def build_parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"mellum2 {cmd}", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="generate text from a prompt" if cmd == "generate"
                                else "fill in the middle between a prefix and a suffix")
    a = p.add_argument
    a("--model", required=True, help="checkpoint directory or training run directory")
    if cmd == "generate":
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--prompt", help="prompt text")
        g.add_argument("--prompt-file", help="read the prompt from this file")
        a("--no-bos", action="store_true", help="do not put <|endoftext|> (the bos) before the prompt")
    else:
        a("--prefix", required=True, help="code before the cursor")
        a("--suffix", default="", help="code after the cursor")
    a("--tokenizer", default=None, help="tokenizer directory (default: found next to the model)")
    a("--max-new-tokens", type=int, default=256)
    a("--temperature", type=float, default=0.0, help="0 = greedy")
    a("--top-k", type=_int, default=None, help="keep the k most likely tokens (capped at the vocabulary size)")
    a("--top-p", type=float, default=None)
    a("--min-p", type=float, default=None)
    a("--repetition-penalty", type=float, default=1.0)
    a("--presence-penalty", type=float, default=0.0)
    a("--seed", type=int, default=None)
    a("--stop", action="append", default=[], help="stop string (repeatable)")
    a("--speculative", action="store_true", help="MTP self-speculative decoding")
    a("--draft-tokens", type=int, default=1,
      help=f"drafts per step with --speculative (the head reused; capped at {MAX_DRAFT_TOKENS})")
    a("--full-draft-vocab", action="store_true", help="ignore the checkpoint's draft_vocab.json")
    a("--dtype", choices=sorted(DTYPES), default="fp32")
    a("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a("--compile", action="store_true",
      help="torch.compile the decode step (and greedy --speculative steps): faster decoding after a one-off "
           "compile per graph (README.md: how long)")
    return p


class TextStream:
    """Incremental detokenisation: print only text that can no longer change."""

    def __init__(self, tokenizer, out=None):
        self.tok, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], 0

    def push(self, ids: list[int]) -> None:
        self.ids += ids
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    def finish(self, drop_last: bool) -> None:
        text = self.tok.decode(self.ids[:-1] if drop_last else self.ids)
        self.out.write(text[self.shown:] + "\n")
        self.out.flush()


def _check_args(cmd: str, args) -> None:
    """Arguments refused or capped before the model is loaded."""
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads: expected >= 1, got {args.threads}")
    if args.draft_tokens > MAX_DRAFT_TOKENS:
        print(f"note: --draft-tokens {args.draft_tokens} capped to {MAX_DRAFT_TOKENS} (more drafts from the one MTP "
              f"head are rarely accepted)", file=sys.stderr)
        args.draft_tokens = MAX_DRAFT_TOKENS
    for flag in (("--prompt",) if cmd == "generate" else ("--prefix", "--suffix")):
        value = getattr(args, flag[2:])
        if value is not None:
            utf8_text(value, flag)


def run(cmd: str, args) -> int:
    _check_args(cmd, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    mdir = resolve_model_dir(args.model, "--model")
    tok = resolve_tokenizer(args.tokenizer, mdir)
    model = load_pretrained(mdir, dtype=DTYPES[args.dtype])
    if args.top_k is not None and args.top_k > model.cfg.vocab_size:
        print(f"note: --top-k {args.top_k} capped to the vocabulary size {model.cfg.vocab_size} (no top-k cut)",
              file=sys.stderr)
        args.top_k = model.cfg.vocab_size
    if cmd == "generate":
        try:
            text = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
        except OSError as e:
            raise CliError(f"--prompt-file {describe_os_error(e)}") from None
        except UnicodeDecodeError as e:
            raise CliError(f"--prompt-file {args.prompt_file}: not valid UTF-8 (byte 0x{e.object[e.start:e.start + 1].hex()} "
                           f"at offset {e.start})") from None
        ids = ([] if args.no_bos else [tok.bos_id]) + tok.encode(text, allow_special=False)
        stop_ids = tuple(i for i in (tok.eot_id, tok.eos_id) if i is not None)
        if not ids:
            raise CliError("the prompt is empty (and --no-bos was given)")
    else:
        ids = fim_prompt(tok, args.prefix, args.suffix)
        stop_ids = fim_stop_ids(tok)
    try:
        params = make_params(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                             list(stop_ids) + list(args.stop), min_p=args.min_p,
                             repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty)
    except ValueError as e:
        raise CliError(str(e).replace("SamplingParams.", "--").replace("_", "-")) from None
    eng = Engine(model, compile=args.compile,
                 draft_vocab=None if args.full_draft_vocab or model.mtp is None else load_draft_vocab(mdir))
    gen = eng.stream([ids], params, speculative=args.speculative, draft_tokens=args.draft_tokens,
                     detokenize=tok.decode)
    out = TextStream(tok)
    t0 = time.perf_counter()
    for d in gen:
        out.push(d.tokens)
    wall = time.perf_counter() - t0
    r, s = gen.results[0], gen.stats
    out.finish(drop_last=r.finish_reason == "stop" and bool(r.tokens) and r.tokens[-1] in stop_ids)
    line = (f"[{s.new_tokens} tokens in {wall:.2f}s: {s.tokens_per_s:.1f} tok/s decode, prefill "
            f"{s.prompt_tokens / max(s.prefill_s, 1e-9):.0f} tok/s, finish: {r.finish_reason}")
    if s.compile_s:
        line += f"; {s.compile_s:.1f}s compiling (not in tok/s)"
    if s.speculative:
        line += (f"; speculative k={s.draft_tokens}: acceptance {s.acceptance:.2f} ({s.accepted}/{s.drafted}), "
                 f"{s.mean_accepted_length:.2f} tokens per trunk pass")
    elif s.notice:
        line += f"; {s.notice}"
    print(line + "]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("generate", "complete"):
        print("usage: mellum2.infer.cli {generate,complete} [options]  (got "
              f"{argv[0] if argv else 'nothing'!r})", file=sys.stderr)
        return 2
    cmd = argv[0]
    args = build_parser(cmd).parse_args(argv[1:])
    try:
        return run(cmd, args)
    except MellumError:
        raise
    except ValueError as e:  # an argument the engine refuses (a prompt too long, ...): a user error
        raise CliError(str(e)) from None


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(run_stage(argv[0] if argv else "generate", main, argv))
