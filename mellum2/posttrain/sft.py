"""`mellum2 sft`: supervised fine-tuning into the Instruct or Thinking variant, on the pre-training machinery.

    mellum2 sft --from runs/demo --mode instruct --out runs/sft-instruct            # the embedded data
    mellum2 sft --from runs/demo --mode thinking --data chats.jsonl --out runs/sft-thinking --epochs 3
    mellum2 sft --from runs/demo --mode instruct --out runs/sft-instruct --resume    # continue exactly

A linear recipe: conversations (the embedded SFT data, or files read by formats.py) -> examples with
their loss masks (sft_examples.py: every assistant turn for Instruct; the last turn and its reasoning,
unfolded over the conversation, for Thinking) -> best-fit packed rows, over-long examples dropped and
counted (sftpack.py) -> the model of `--from` -> the same `parallelize`, Muon + AdamW, `Trainer`
(one objective, mellum2/model/objective.py: CE + 0.1 MTP + aux + z) and run loop (mellum2/train/loop.py:
checkpoints, exact resume, metrics.jsonl, progress bar, loss plot) as pre-training -> the final
model exported into `--out` itself.

Mellum 2's SFT (docs/posttrain.md): packed sequences with over-long samples dropped, not truncated;
3 epochs; clip 1.0; Muon; the MTP head kept training; MoE aux coefficient 1e-4 (`--aux-coef`, written
into the model's config); learning rate a tenth of pre-training's peak (3e-5 after 3e-4). Our
decisions where the report is silent: linear warmup (3% of the steps) then linear decay to 0; the
default `--lr` is a tenth of the `--from` run's pre-training peak when its args.json says it, else 3e-5.

Bad input: with `--on-error raise` (default) the first bad row stops the run before any training, with
an error naming the file, line and field; `--on-error skip` counts and skips it. An example longer than
`--seq-len` is always dropped and counted. Writes are atomic: checkpoints as in pre-training; the export
writes the weights and tokenizer files first and config.json last (a directory without config.json is
no finished model, and loaders then fall back to the newest checkpoint).

`--out` afterwards is a run directory (checkpoints/, metrics.jsonl, loss.png, summary.json, args.json,
tokenizer/) and a model directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.jinja) that `mellum2 chat --model OUT`, `mellum2.generate` and transformers load.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from mellum2 import atomic
from mellum2.allocator import keep_freed_memory
from mellum2.chat.template import ChatFormatError
from mellum2.errors import MellumError, run_stage
from mellum2.locate import resolve_model_dir, tokenizer_dir
from mellum2.model import ModelConfig, load_pretrained
from mellum2.model.accounting import flops_per_token
from mellum2.tokenizer import Tokenizer
from mellum2.train import checkpoint as ckpt
from mellum2.train.loop import Run, write_json
from mellum2.train.metrics import MetricsLogger, measure_peak_flops
from mellum2.train.optim import build_optimizers
from mellum2.train.parallel import init_distributed, install_count_reducer, parallelize, shutdown
from mellum2.train.runlock import RunLock
from mellum2.train.schedule import WarmupHoldDecay
from mellum2.train.trainer import Trainer

from .formats import DataFormatError, load_conversations
from .sft_examples import MODES, sft_examples
from .sftdata import sft_conversations
from .sftpack import SFTLoader

EMBEDDED = "embedded"
DEFAULT_LR = 3e-5  # Mellum 2's SFT learning rate (12B); small models take a tenth of their own pre-training peak
AUX_COEF = 1e-4  # Mellum 2's MoE load-balancing coefficient for SFT

# what the demo runs after pre-training `tiny`: a third of the embedded conversations once (~220K tokens)
DEMO_ARGS = ["--mode", "instruct", "--conversations", "1000", "--epochs", "1", "--seq-len", "1024",
             "--batch-size", "4", "--lr", "1e-3", "--log-every", "5", "--no-tensorboard"]


class SFTError(MellumError):
    """Bad arguments or data for `mellum2 sft`; the message names which."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mellum2 sft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--from", dest="from_", metavar="RUN_OR_CKPT", required=True,
      help="the model to fine-tune: a checkpoint directory or a training run directory (its newest checkpoint)")
    a("--data", default=EMBEDDED, help=f"SFT data: a file or directory (OpenAI messages JSONL, ShareGPT, "
      f"Hugging Face datasets), or '{EMBEDDED}' for the generated data (docs/posttrain.md)")
    a("--mode", choices=MODES, default="instruct", help="instruct: every assistant turn, no reasoning; "
      "thinking: the last turn with its reasoning, conversations unfolded")
    a("--out", required=True, help="output directory: the run, and the fine-tuned model itself")
    a("--seq-len", type=int, default=None, help="packed row length; default min(max_position_embeddings, 8192)")
    a("--batch-size", type=int, default=8, help="rows per micro-batch per process")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    a("--epochs", type=int, default=3, help="passes over the examples")
    a("--max-steps", type=int, default=None, help="stop after this many optimiser steps (the schedule ends there)")
    a("--lr", type=float, default=None, help="peak learning rate (Muon and AdamW); default: a tenth of the "
      f"--from run's pre-training peak, else {DEFAULT_LR:g}")
    a("--warmup-steps", type=int, default=None, help="default: 3%% of the steps (at least 1)")
    a("--weight-decay", type=float, default=0.1)
    a("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    a("--aux-coef", type=float, default=AUX_COEF, help="MoE load-balancing loss coefficient (written into the config)")
    a("--max-samples", type=int, default=5, help="thinking: examples per conversation at most")
    a("--conversations", type=int, default=None, help=f"with --data {EMBEDDED}: how many (default 3000)")
    a("--on-error", choices=("raise", "skip"), default="raise",
      help="a bad row or conversation: stop with an error naming it, or skip it and count it")
    a("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype; masters are fp32")
    a("--fp8", action="store_true", help="FP8 hybrid for attention projections and experts")
    a("--fp8-backend", choices=("auto", "emulate", "scaled_mm"), default="auto")
    a("--ac", action="store_true", help="activation checkpointing per decoder layer")
    a("--compile", action="store_true", help="torch.compile each decoder layer and the loss")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep", type=int, default=2, help="checkpoints kept")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--log-every", type=int, default=10, help="steps per logging interval (one host sync each)")
    a("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    a("--seed", type=int, default=0)
    a("--peak-tflops", type=float, default=None, help="device peak for MFU; default: measured matmul peak")
    a("--device", choices=("cpu", "cuda"), default=None)
    a("--no-tensorboard", action="store_true")
    a("--no-progress", action="store_true")
    return p


# ---------------------------------------------------------------------------- data
def load_data(data: str, mode: str, on_error: str, conversations: int | None, seed: int) -> tuple[list[dict], str]:
    """Conversations and a one-line description of where they came from."""
    if data == EMBEDDED:
        convs = sft_conversations("train", mode, n=conversations, seed=seed)
        return convs, f"{len(convs)} embedded {mode} conversations (train split)"
    if conversations is not None:
        raise SFTError(f"--conversations is for --data {EMBEDDED}; a file is used whole")
    convs, stats = load_conversations(data, on_error)
    if not convs:
        raise SFTError(f"--data {data}: no usable conversation ({stats.summary()})")
    return convs, stats.summary()


def make_examples(tokenizer, convs: list[dict], mode: str, on_error: str, max_samples: int) -> tuple[list, dict, list]:
    """(examples, counts, the source of each example): the (input_ids, labels) of every conversation; a conversation the chat
    template rejects raises SFTError naming its source, or is skipped and counted."""
    examples, sources = [], []
    counts = {"conversations": len(convs), "skipped": 0, "no_example": 0, "reasons": []}
    for i, c in enumerate(convs):
        where = c.get("source") or c.get("id") or f"conversation {i}"
        try:
            ex = sft_examples(tokenizer, c["messages"], mode, c.get("tools"), max_samples=max_samples)
        except ChatFormatError as e:
            if on_error == "raise":
                raise DataFormatError(f"{where}: {e}") from None
            counts["skipped"] += 1
            if len(counts["reasons"]) < 20:
                counts["reasons"].append(f"{where}: {e}")
            continue
        if not ex:
            counts["no_example"] += 1  # thinking: no turn with reasoning; instruct: no assistant turn
        examples += ex
        sources += [where] * len(ex)
    counts["examples"] = len(examples)
    return examples, counts, sources


# ---------------------------------------------------------------------------- model in, model out
def base_lr(src: Path) -> float | None:
    """The pre-training peak learning rate of the run that wrote checkpoint `src`, when its args.json says."""
    for d in list(src.parents)[:3]:
        f = d / "args.json"
        if f.is_file():
            try:
                lr = json.loads(f.read_text())["trajectory"]["lr"]
            except (json.JSONDecodeError, KeyError, TypeError):
                return None
            return float(lr) if isinstance(lr, (int, float)) and lr > 0 else None
    return None


MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def export(out: Path, ckpt_model: Path, tokenizer: Tokenizer) -> None:
    """Make `out` itself the model directory: the final checkpoint's weights, the tokenizer files, then
    config.json (the mark of a finished model) last, each written atomically."""
    (out / "config.json").unlink(missing_ok=True)
    for f in list(out.glob("model-*.safetensors")) + [out / n for n in MODEL_FILES[1:]]:
        f.unlink(missing_ok=True)  # an earlier export, possibly sharded differently
    for f in sorted(ckpt_model.iterdir()):
        if f.is_file() and f.name != "config.json":
            with atomic.atomic_path(out / f.name, suffix=f.suffix) as tmp:
                shutil.copyfile(f, tmp)
    tokenizer.save(out)
    atomic.write_text(out / "config.json", (ckpt_model / "config.json").read_text())


# ---------------------------------------------------------------------------- the stage
def _check_args(args, cfg: ModelConfig) -> None:
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "max_bad_steps", "keep", "max_steps",
                 "max_samples", "conversations"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SFTError(f"--{name.replace('_', '-')}: expected >= 1, got {v}")
    if not 16 <= args.seq_len <= cfg.max_position_embeddings:
        raise SFTError(f"--seq-len {args.seq_len}: expected 16..max_position_embeddings ({cfg.max_position_embeddings})")
    for name in ("save_every", "weight_decay", "clip", "warmup_steps", "seed", "aux_coef"):
        v = getattr(args, name)
        if v is not None and not (v >= 0 and (name == "clip" or math.isfinite(v))):
            raise SFTError(f"--{name.replace('_', '-')}: expected >= 0, got {v}")
    for name in ("lr", "peak_tflops"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise SFTError(f"--{name.replace('_', '-')}: expected a positive number, got {v}")


def _prepare_out(out: Path, resume: bool, say=print) -> Path | None:
    """The checkpoint to resume from (None for a fresh run), after checking `out` can take this run."""
    found = ckpt.newest_verified(out, say) if resume else None  # a damaged newer one: named, set aside
    if resume and found is None:
        raise SFTError(f"--resume: no finished checkpoint in {ckpt.checkpoints_root(out)}; run without --resume")
    if not resume and ckpt.list_checkpoints(out):
        raise SFTError(f"{out} already holds checkpoints (newest {ckpt.list_checkpoints(out)[-1][1].name}); "
                       f"pass --resume to continue it or choose another --out")
    if not resume and (out / "config.json").exists():
        raise SFTError(f"--out {out}: already holds a model (config.json); choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SFTError(f"--out {out}: cannot create the output directory ({e.strerror or e})") from None
    ckpt.check_writable(out)
    return found


def sft(args) -> Path:
    d = init_distributed(args.device)
    say = print if d.is_main else (lambda *a, **k: None)
    src = resolve_model_dir(args.from_, "--from")
    cfg = ModelConfig.from_hf(src).replace(router_aux_loss_coef=args.aux_coef)
    args.seq_len = args.seq_len or min(cfg.max_position_embeddings, 8192)
    _check_args(args, cfg)
    tok_dir = tokenizer_dir(src)
    tokenizer = Tokenizer.load(tok_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SFTError(f"--from {src}: the model's vocab_size {cfg.vocab_size} is smaller than its tokenizer's "
                       f"{tokenizer.vocab_size} ({tok_dir})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SFTError(f"--out {out}: exists and is not a directory")

    # ---- data: conversations -> examples -> packed rows (a bad row stops the run before anything is written)
    convs, where = load_data(args.data, args.mode, args.on_error, args.conversations, args.seed)
    examples, counts, sources = make_examples(tokenizer, convs, args.mode, args.on_error, args.max_samples)
    try:
        loader = SFTLoader(examples, seq_len=args.seq_len, batch_size=args.batch_size, epochs=args.epochs,
                           pad_id=tokenizer.pad_id, seed=args.seed, rank=d.rank, world_size=d.world,
                           grad_accum=args.grad_accum)
    except ValueError as e:
        raise SFTError(f"--data {args.data}: {e}") from None
    long = [sources[i] for i, (x, _) in enumerate(examples) if len(x) > args.seq_len]
    counts.update(dropped_too_long=loader.dropped, unlabelled=loader.unlabelled, rows=len(loader.rows),
                  pad_fraction=round(loader.pad_fraction, 4), dropped_first=long[:5])
    total_steps = min(loader.steps, args.max_steps or loader.steps)
    tps = args.batch_size * args.seq_len * args.grad_accum * d.world
    lr = args.lr if args.lr is not None else ((base_lr(src) or DEFAULT_LR * 10) / 10)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.03 * total_steps))
    schedule = WarmupHoldDecay(lr, min(warmup, total_steps), min(warmup, total_steps), total_steps)
    trajectory = {"config": cfg.to_hf_dict(), "from": str(src.resolve()), "data": args.data, "mode": args.mode,
                  "examples": loader.fingerprint, "seq_len": args.seq_len, "batch_size": args.batch_size,
                  "grad_accum": args.grad_accum, "epochs": args.epochs, "world_size": d.world,
                  "total_steps": total_steps, "lr": lr, "warmup_steps": warmup, "weight_decay": args.weight_decay,
                  "clip": args.clip, "precision": args.precision, "fp8": args.fp8, "seed": args.seed}

    with RunLock(out, say=say) if d.is_main else contextlib.nullcontext():  # one writer per run directory
        found = _prepare_out(out, args.resume, say) if d.is_main else (ckpt.latest(out) if args.resume else None)
        return _train(args, d, say, src, cfg, tokenizer, out, found, loader, schedule, trajectory, counts, where,
                      long, total_steps, tps, lr, warmup)


def _train(args, d, say, src, cfg, tokenizer, out, found, loader, schedule, trajectory, counts, where, long,
           total_steps, tps, lr, warmup) -> Path:
    # ---- model, parallelism, optimisers, trainer
    model = ckpt.load_model(found) if found is not None else load_pretrained(src, dtype=torch.float32, cfg=cfg).train()
    model.to(d.device)
    applied = parallelize(model, d, fp8=args.fp8, fp8_backend=args.fp8_backend, ac=args.ac, compile=args.compile,
                          precision=args.precision)
    tap = install_count_reducer(model, d)
    optims = build_optimizers(model, lr, weight_decay=args.weight_decay)
    trainer = Trainer(model, optims, schedule, loader, d, grad_accum=args.grad_accum, precision=args.precision,
                      clip=args.clip, max_bad_steps=args.max_bad_steps, tap=tap)
    job = Run(out, trainer, model, optims, loader, schedule, cfg, d, trajectory, keep=args.keep)
    job.restore(found)
    if d.is_main:
        if not (out / "tokenizer").exists():
            with atomic.atomic_dir(out / "tokenizer") as tmp:
                tokenizer.save(tmp)
        write_json(out / "args.json", {**vars(args), "trajectory": trajectory, "parallel": applied, "data_counts": counts})

    say(f"mellum2 sft ({args.mode}): {where}; {counts['examples']} examples "
        f"({counts['skipped']} conversations skipped, {counts['no_example']} without an example), "
        f"{loader.dropped} longer than --seq-len {args.seq_len} dropped, {len(loader.rows)} rows over {args.epochs} "
        f"epoch(s) ({loader.pad_fraction:.1%} padding)")
    if counts["skipped"]:
        say(f"  first skipped: {counts['reasons'][0]}")
    if long:
        say(f"  first dropped: {', '.join(long[:3])}")
    if found is not None:
        say(f"resumed from {found} at step {trainer.step}")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (measure_peak_flops(
        d.device, torch.bfloat16 if args.precision == "bf16" else torch.float32) if d.is_main else None)
    say(f"  from {src}: {total_steps} steps x {tps:,} tokens, {args.precision}{' + fp8' if args.fp8 else ''}, "
        f"lr {lr:g} (warmup {warmup}, linear decay), aux {args.aux_coef:g}, clip {args.clip:g}, "
        f"MTP {'on' if model.cfg.num_nextn_predict_layers else 'absent'} -> {out}")
    logger = MetricsLogger(out, enabled=d.is_main, total_steps=total_steps, start_step=trainer.step,
                           start_tokens=trainer.tokens, flops_per_token=flops_per_token(cfg, args.seq_len)["train"],
                           peak_flops=peak, tensorboard=not args.no_tensorboard, progress=not args.no_progress)
    job.loop(total_steps, logger, args.log_every, args.save_every)
    bounds = [b for b in loader.epoch_start_steps()[:-1] if b < total_steps] + [total_steps]
    summary = job.finish(bounds, label="epoch")
    if d.is_main:
        summary = {**summary, "mode": args.mode, "data": counts, "epoch_start_steps": bounds[:-1]}
        write_json(out / "summary.json", summary)
        export(out, ckpt.latest(out) / "model", tokenizer)
        say(json.dumps({k: summary[k] for k in ("steps", "skipped", "tokens")}
                       | {"loss_first": _first_last(out)[0], "loss_last": _first_last(out)[1]}))
        say(f"saved the {args.mode} model in {out} (`mellum2 chat --model {out}`)")
    return out


def _first_last(out: Path) -> tuple[float | None, float | None]:
    """The first logged loss and the mean of the last 10 (metrics.jsonl)."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if not r.get("skipped")]
    if not recs:
        return None, None
    tail = recs[-10:]
    return round(recs[0]["loss"], 4), round(sum(r["loss"] for r in tail) / len(tail), 4)


def run(argv: list[str] | None = None) -> Path:
    """Parse `argv` like the CLI and fine-tune; returns the output directory (for the demo and tests)."""
    return sft(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        sft(args)
        return 0
    finally:
        shutdown()


if __name__ == "__main__":  # torchrun -m mellum2.posttrain.sft: errors as one line, like `mellum2 sft`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run_stage("sft", main))
