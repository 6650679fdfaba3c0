"""`mellum2 train`: pre-train Mellum 2 on the three-phase curriculum (docs/train.md).

    mellum2 train --preset tiny --out runs/tiny --max-steps 300 --batch-size 8 --seq-len 512
    torchrun --nproc_per_node 2 -m mellum2.train.pretrain --preset tiny --out runs/tiny2 --max-steps 300
    mellum2 train --out runs/tiny --resume            # continue exactly where the last checkpoint left off
    mellum2 train --stage long-context --from runs/tiny --rope-factor 8 --seq-len 4096 --max-steps 200 --out runs/tiny-4k

A linear recipe: process group -> data -> model (fresh or from the checkpoint) -> parallelize
(FP8, activation checkpointing, compile, FSDP2) -> optimisers (Muon + AdamW) -> Warmup-Hold-Decay
over the loader's phase boundaries -> restore the training state -> loop (log, checkpoint) -> final
checkpoint, loss plot, sample completions. `--stage long-context` swaps two pieces: the model comes
from `--from` with its context extended (long_context.py) and the data from `LongContextLoader`.
`run(argv)` returns the output directory (the demo calls it).
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
from mellum2.data.curriculum import PHASE_PRESETS, named_phases
from mellum2.errors import MellumError, run_stage
from mellum2.model import Mellum2, ModelConfig
from mellum2.model.accounting import check_memory, flops_per_token
from mellum2.tokenizer import Tokenizer

from . import checkpoint as ckpt
from .data import make_loader
from .errors import TrainError
from .long_context import ROPE_LAYERS, extended_config, load_extended, source_dir
from .loop import Run, write_json
from .metrics import MetricsLogger, measure_peak_flops
from .optim import build_optimizers
from .parallel import all_gather_objects, broadcast_object, init_distributed, install_count_reducer, parallelize, shutdown
from .runlock import RunLock, RunLocked
from .sample import completions
from .schedule import WarmupHoldDecay
from .trainer import Trainer

# peak learning rate per preset when --lr is not given (Mellum 2's 3e-4 is for the 12B model; the
# small presets were tuned on the embedded corpus, see docs/train.md)
DEFAULT_LR = {"mellum2-12b": 3e-4, "mellum2-12b-8k": 3e-4, "tiny": 3e-3, "test-small": 3e-3, "test-small2": 3e-3}

# bytes per parameter a training process holds (fp32 weights + gradients + AdamW's two moments; Muon
# keeps one), before activations: what `check_memory` compares with the memory available
TRAIN_BYTES_PER_PARAM = 16

# what the demo runs: ~3.6M tokens of `tiny` (packed rows, MTP on, compiled by --compile auto; README.md
# says how long it takes), on the code-heavy curriculum (docs/train.md "The demo's recipe")
DEMO_ARGS = ["--preset", "tiny", "--max-steps", "880", "--batch-size", "8", "--seq-len", "512",
             "--save-every", "220", "--log-every", "10", "--phases", "demo"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mellum2 train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--stage", choices=("pretrain", "long-context"), default="pretrain",
      help="pretrain: the three-phase curriculum; long-context: extend --from's context with YaRN and train on long rows")
    a("--preset", default="tiny", help="model preset (mellum2.model.config.PRESETS)")
    a("--config", default=None, help="a config.json (or checkpoint directory) instead of --preset")
    a("--data", default=None, help="prepared data directory, or 'synthetic'; default: the embedded corpus")
    a("--out", default=None, help="output directory (default runs/<preset>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps of the whole run")
    g.add_argument("--tokens", type=int, default=None, help="global tokens of the whole run")
    a("--batch-size", type=int, default=8, help="sequences per micro-batch per process")
    a("--seq-len", type=int, default=None, help="default: min(max_position_embeddings, 8192)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    a("--lr", type=float, default=None, help="peak learning rate (Muon and AdamW); default per preset")
    a("--phases", default=None,
      help=f"the curriculum: a preset ({', '.join(PHASE_PRESETS)}; default report) or a JSON list of "
           "phases ({budget, mixture, fim_rate, fim_code_only, spm_rate}); the LR decays over the last phase")
    a("--mtp-loss-weight", type=float, default=None, help="weight of the MTP loss (default: the model config's)")
    a("--warmup-steps", type=int, default=None, help="default: min(2000, 5%% of the steps)")
    a("--weight-decay", type=float, default=0.1)
    a("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    a("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype; masters are fp32")
    a("--fp8", action="store_true", help="FP8 hybrid for attention projections and experts")
    a("--fp8-backend", choices=("auto", "emulate", "scaled_mm"), default="auto")
    a("--ep", action="store_true", help="expert parallel over all processes (train/expert_parallel.py)")
    a("--ac", action="store_true", help="activation checkpointing per decoder layer")
    a("--compile", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
      help="torch.compile each decoder layer and the loss: on (also plain --compile), off, or auto "
           f"(default): on for bf16 pre-training on a CPU of at least {COMPILE_AUTO_MIN_STEPS} steps, "
           "where the one-off compile pays for itself (see decide_compile)")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep", type=int, default=3, help="checkpoints kept")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--log-every", type=int, default=10, help="steps per logging interval (one host sync each)")
    a("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    a("--seed", type=int, default=0)
    a("--peak-tflops", type=float, default=None, help="device peak for MFU; default: measured matmul peak")
    a("--samples", type=int, default=48, help="greedy tokens per sample prompt at the end (0: none)")
    a("--device", choices=("cpu", "cuda"), default=None)
    lc = p.add_argument_group("long-context stage (--stage long-context)")
    lc.add_argument("--from", dest="from_", metavar="CHECKPOINT", default=None,
                    help="checkpoint or run directory to extend")
    lc.add_argument("--rope-factor", type=float, default=16.0, help="YaRN factor S (Mellum 2: 8K -> 128K is 16)")
    lc.add_argument("--rope-layers", choices=tuple(ROPE_LAYERS), default="full",
                    help="full: YaRN on full-attention layers only (Mellum 2); all: every layer; none: plain RoPE")
    lc.add_argument("--original-context", type=int, default=None,
                    help="the base's trained context; default: its max_position_embeddings")
    lc.add_argument("--repo-fraction", type=float, default=0.5, help="share of row items that are repository samples")
    lc.add_argument("--repo-fim-rate", type=float, default=0.5, help="repository samples turned into repo-level FIM")
    a("--no-tensorboard", action="store_true")
    a("--no-progress", action="store_true")
    return p


# `--compile auto` turns compiling on from this many steps: on `tiny` (bf16, 8 x 512, this 2-core CPU) a
# compiled step saves ~0.3 s (0.65 vs 0.95 s) and compiling costs ~2-2.5 min on an empty inductor cache
# (seconds on a warm one), so it pays from ~450 steps; larger models save more per step.
COMPILE_AUTO_MIN_STEPS = 500


def decide_compile(mode: str, *, device_type: str, precision: str, fp8: bool, stage: str, steps: int,
                   compiler: str | None) -> tuple[bool, str]:
    """(compile?, why) for `--compile MODE`. `auto` compiles only where it is measured to pay and tested:
    bf16 pre-training on a CPU, long enough to repay the compile, with a C++ compiler for inductor
    (`compiler`: its path, None when absent), in one process or several (FSDP2 on gloo: tests/test_parallel.py).
    GPUs, fp32 (whose expert matmuls do not compile), FP8 and the long-context stage stay eager unless
    asked for with `--compile on`."""
    if mode != "auto":
        return mode == "on", f"--compile {mode}"
    reason = None
    if device_type != "cpu":
        reason = "not on GPUs (untested there; --compile on to use it)"
    elif precision != "bf16":
        reason = "not in fp32 (the expert matmuls do not compile)"
    elif fp8:
        reason = "not with --fp8"
    elif stage != "pretrain":
        reason = f"not for --stage {stage}"
    elif steps < COMPILE_AUTO_MIN_STEPS:
        reason = f"{steps} steps < {COMPILE_AUTO_MIN_STEPS}, too short to repay compiling"
    elif compiler is None:
        reason = "no C++ compiler found for inductor"
    if reason:
        return False, f"compile off (auto: {reason})"
    return True, f"compile on (auto: bf16 CPU run of {steps} steps; --compile off to skip)"


def _cxx() -> str | None:
    return next((p for p in (os.environ.get("CXX"), "g++", "c++", "clang++") if p and shutil.which(p)), None)


def _model_config(args) -> ModelConfig:
    cfg = ModelConfig.from_hf(args.config) if args.config else ModelConfig.from_preset(args.preset)
    if args.mtp_loss_weight is None:
        return cfg
    if not (args.mtp_loss_weight >= 0 and math.isfinite(args.mtp_loss_weight)):
        raise TrainError(f"--mtp-loss-weight: expected >= 0, got {args.mtp_loss_weight:g}")
    return cfg.replace(mtp_loss_weight=args.mtp_loss_weight)


def _check_args(args, cfg) -> None:
    for name in ("batch_size", "grad_accum", "log_every", "max_bad_steps", "keep", "max_steps", "tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise TrainError(f"--{name.replace('_', '-')}: expected >= 1, got {v}")
    if args.seq_len < 16 or args.seq_len > cfg.max_position_embeddings:
        raise TrainError(f"--seq-len {args.seq_len}: expected 16..max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    for name in ("save_every", "weight_decay", "clip", "warmup_steps", "seed"):
        v = getattr(args, name)
        if v is not None and not (v >= 0 and (name == "clip" or math.isfinite(v))):  # --clip inf: no clipping
            raise TrainError(f"--{name.replace('_', '-')}: expected >= 0, got {v}")
    _phases(args)  # a bad --phases is an error before the run directory is touched
    for name in ("lr", "peak_tflops"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise TrainError(f"--{name.replace('_', '-')}: expected a positive number, got {v}")


def _phases(args):
    """The curriculum --phases names (None: the report's), or a TrainError saying what is wrong."""
    if args.phases is not None and args.stage != "pretrain":
        raise TrainError("--phases is for pre-training (the long-context stage has its own loader)")
    try:
        return named_phases(args.phases)
    except (ValueError, TypeError) as e:
        raise TrainError(str(e)) from None


def _pretrain(args) -> Path:
    d = init_distributed(args.device)
    say = print if d.is_main else (lambda *a, **k: None)
    long_ctx = args.stage == "long-context"
    if long_ctx:
        if args.from_ is None:
            raise TrainError("--stage long-context needs --from CHECKPOINT (the model whose context to extend)")
        if args.rope_factor < 1:
            raise TrainError(f"--rope-factor: expected >= 1, got {args.rope_factor}")
        src = source_dir(args.from_)
        cfg = extended_config(src, args.rope_factor, args.rope_layers, args.original_context)
    else:
        if args.from_ is not None:
            raise TrainError("--from is for --stage long-context (use --resume to continue a pre-training run)")
        cfg = _model_config(args)
    args.seq_len = args.seq_len or min(cfg.max_position_embeddings, 8192)
    _check_args(args, cfg)
    # fp32 weights, gradients and up to two optimiser moments per parameter, sharded over the ranks by FSDP;
    # checked before anything is allocated (the synthetic loader's tables grow with vocab_size too)
    check_memory(cfg, TRAIN_BYTES_PER_PARAM / d.world, d.device, what="training state (weights, gradients, optimiser)",
                 where=str(args.config or f"--preset {args.preset}") if not long_ctx else str(src))
    out = Path(args.out or (f"{str(args.from_).rstrip('/')}-long" if long_ctx else f"runs/{args.preset}"))
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out}: exists and is not a directory")
    with _lock_run_dir(out, d, say):  # before anything is read or written (runlock.py)
        return _train(args, d, say, cfg, out, long_ctx, src if long_ctx else None)


def _lock_run_dir(out: Path, d, say):
    """Rank 0 takes the run directory's lock; every rank learns whether it did (all fail together)."""
    lock, err = None, None
    if d.is_main:
        try:
            lock = RunLock(out, say=say).acquire()
        except MellumError as e:
            err = e
    others = [m for m in all_gather_objects(str(err) if err else None, d) if m]
    if err is not None:
        raise err
    if others:
        raise RunLocked(others[0])
    return lock if lock is not None else contextlib.nullcontext()


def _on_main(d, fn):
    """fn() on rank 0, its result (or its user-facing error, re-raised everywhere) on every rank."""
    res, err = None, None
    if d.is_main:
        try:
            res = fn()
        except MellumError as e:
            err = e
    got = broadcast_object((res, str(err) if err else None), d)
    if err is not None:
        raise err
    if got[1]:
        raise TrainError(got[1])
    return got[0]


def _open_run_dir(args, out: Path, say) -> Path | None:
    """Rank 0's checks of the run directory; the checkpoint to resume from (None for a fresh run)."""
    if not args.resume and ckpt.list_checkpoints(out):
        raise TrainError(f"{out} already holds checkpoints (newest {ckpt.list_checkpoints(out)[-1][1].name}); "
                         f"pass --resume to continue it or choose another --out")
    found = ckpt.newest_verified(out, say) if args.resume else None  # a damaged newer one: named, set aside
    if args.resume and found is None:
        raise TrainError(f"--resume: no finished checkpoint in {ckpt.checkpoints_root(out)}; "
                         f"run without --resume to start a new run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"--out {out}: cannot create the output directory ({e.strerror or e})") from None
    ckpt.check_writable(out)  # a read-only checkpoints/ fails now, not after the first steps
    return found


def _train(args, d, say, cfg, out: Path, long_ctx: bool, src) -> Path:
    found = _on_main(d, lambda: _open_run_dir(args, out, say))

    # ---- data and the step/token budget
    tps = args.batch_size * args.seq_len * args.grad_accum * d.world
    if args.max_steps is not None:
        total_steps = args.max_steps
    elif args.tokens is not None:
        total_steps = args.tokens // tps
    else:
        raise TrainError("give the length of the run: --max-steps N or --tokens N")
    if total_steps < 1:
        raise TrainError(f"--tokens {args.tokens} is less than one step ({tps} tokens per step: batch size x "
                         f"sequence length x gradient accumulation x processes); raise --tokens or use --max-steps")
    total_tokens = total_steps * tps
    phases = _phases(args)
    loader, data_dir = make_loader(args.data, vocab_size=cfg.vocab_size, batch_size=args.batch_size,
                                   seq_len=args.seq_len, total_tokens=total_tokens, rank=d.rank,
                                   world_size=d.world, seed=args.seed,
                                   long_context=dict(repo_fraction=args.repo_fraction,
                                                     repo_fim_rate=args.repo_fim_rate) if long_ctx else None,
                                   phases=phases)
    lr = args.lr if args.lr is not None else (3e-4 if long_ctx else DEFAULT_LR.get(args.preset, 3e-4))
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, min(2000, total_steps // 20))
    schedule = WarmupHoldDecay.from_phase_boundaries(lr, warmup, loader.phase_boundaries, tps)
    boundaries_steps = [-(-b // tps) for b in loader.phase_boundaries]
    trajectory = {"config": cfg.to_hf_dict(), "seq_len": args.seq_len, "batch_size": args.batch_size,
                  "grad_accum": args.grad_accum, "world_size": d.world, "total_tokens": total_tokens,
                  "lr": lr, "warmup_steps": warmup, "weight_decay": args.weight_decay, "clip": args.clip,
                  "precision": args.precision, "fp8": args.fp8, "seed": args.seed, "data": args.data or "default"}
    if args.phases is not None:  # only when given, so runs from before the flag still resume
        trajectory["phases"] = args.phases
    if long_ctx:
        trajectory.update(stage=args.stage, source=str(src.resolve()), rope_factor=args.rope_factor,
                          rope_layers=args.rope_layers, repo_fraction=args.repo_fraction,
                          repo_fim_rate=args.repo_fim_rate)

    # ---- model, parallelism, optimisers
    if found is not None:
        model = ckpt.load_model(found)
    elif long_ctx:
        model = load_extended(src, cfg)
        say(f"long-context stage: {src} extended x{args.rope_factor:g} to {cfg.max_position_embeddings} tokens, "
            f"YaRN on {', '.join(ROPE_LAYERS[args.rope_layers]) or 'no'} layers")
    else:
        torch.manual_seed(args.seed)  # the same initial weights on every rank (FSDP shards them as they are)
        model = Mellum2(cfg)
    model.to(d.device)
    sizes = f"{model.num_params('all') / 1e6:.1f}M parameters ({model.num_active_params('all') / 1e6:.1f}M active)"
    compile_on, compile_why = decide_compile(args.compile, device_type=d.device.type, precision=args.precision,
                                             fp8=args.fp8, stage=args.stage, steps=total_steps, compiler=_cxx())
    if compile_on and args.compile == "auto":
        # a compile failure (an inductor bug, a broken toolchain) falls back to eager for that graph, with
        # dynamo's warning, instead of ending a run nobody asked to compile
        torch._dynamo.config.suppress_errors = True
    applied = parallelize(model, d, fp8=args.fp8, fp8_backend=args.fp8_backend, ep=args.ep, ac=args.ac,
                          compile=compile_on,
                          precision=args.precision)
    tap = install_count_reducer(model, d)
    optims = build_optimizers(model, lr, weight_decay=args.weight_decay)
    trainer = Trainer(model, optims, schedule, loader, d, grad_accum=args.grad_accum, precision=args.precision,
                      clip=args.clip, max_bad_steps=args.max_bad_steps, tap=tap)

    # ---- restore the training state
    job = Run(out, trainer, model, optims, loader, schedule, cfg, d, trajectory, keep=args.keep)
    job.restore(found)
    if found is not None:
        say(f"resumed from {found} at step {trainer.step} ({trainer.tokens:,} tokens)")
    if d.is_main and data_dir is not None and (data_dir / "tokenizer").is_dir() and not (out / "tokenizer").exists():
        # the run directory carries its tokenizer (inference finds it next to the checkpoints); saved
        # anew rather than copied so it has the current chat template even from an older data directory
        with atomic.atomic_dir(out / "tokenizer") as tmp:
            Tokenizer.load(data_dir / "tokenizer").save(tmp)
    if d.is_main:
        write_json(out / "args.json", {**vars(args), "trajectory": trajectory, "parallel": applied,
                                        "total_steps": total_steps, "phase_boundaries_steps": boundaries_steps})

    fpt = flops_per_token(cfg, args.seq_len)["train"]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (measure_peak_flops(
        d.device, torch.bfloat16 if args.precision == "bf16" else torch.float32) if d.is_main else None)
    say(f"mellum2 train: {sizes}, {total_steps} steps x {tps:,} tokens on {d.world} process(es), {args.precision}"
        f"{' + fp8' if args.fp8 else ''}, lr {lr:g}, warmup {warmup}, phases start at steps "
        f"{boundaries_steps[:2]}, peak {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s, {compile_why} -> {out}")
    logger = MetricsLogger(out, enabled=d.is_main, total_steps=total_steps, start_step=trainer.step,
                           start_tokens=trainer.tokens, flops_per_token=fpt, peak_flops=peak,
                           tensorboard=not args.no_tensorboard, progress=not args.no_progress)
    job.loop(total_steps, logger, args.log_every, args.save_every)
    summary = job.finish(boundaries_steps)
    if d.is_main:
        say(json.dumps(summary))
    if args.samples and data_dir is not None and (data_dir / "tokenizer").exists():
        tok = Tokenizer.load(data_dir / "tokenizer")
        res = completions(model, tok, max_new_tokens=args.samples, device=d.device, bf16=args.precision == "bf16")
        if d.is_main:
            text = "".join(f"--- prompt\n{p}\n--- greedy completion\n{c}\n\n" for p, c in res)
            atomic.write_text(out / "samples.txt", text)
            say("\n" + text)
    return out


def run(argv: list[str] | None = None) -> Path:
    """Parse `argv` like the CLI and train; returns the output directory (for the demo)."""
    return pretrain(build_parser().parse_args(argv))


def pretrain(args) -> Path:
    """`_pretrain`, leaving dynamo's `suppress_errors` (which `--compile auto` sets) as it found it."""
    suppress = torch._dynamo.config.suppress_errors
    try:
        return _pretrain(args)
    finally:
        torch._dynamo.config.suppress_errors = suppress


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # also when started as `torchrun -m mellum2.train.pretrain` (not via the CLI)
    try:
        pretrain(args)
        return 0
    finally:
        shutdown()


if __name__ == "__main__":  # torchrun -m mellum2.train.pretrain: errors as one line, like `mellum2 train`
    sys.exit(run_stage("train", main))
