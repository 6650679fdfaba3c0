"""`mellum2 train-mtp`: give any checkpoint an MTP draft head, training the head alone.

    mellum2 train-mtp --model runs/tiny [--steps 300] [--source data|self] [--target trunk|tokens] [--out DIR]

writes runs/tiny-mtp unless --out says otherwise (a training run's checkpoint is never rewritten: its
optimiser state would no longer match its weights).

The released Mellum 2 weights have no MTP head (docs/mellum2.md §1), so they cannot draft for
speculative decoding. This freezes the trunk (embedding, layers, final norm, LM head: the head shares
the embedding and LM head, which stay frozen too), adds a freshly initialised head in our layout
(model/mtp.py) when the checkpoint has none (or `--reinit`), and trains only `mtp.*`:

- inputs (`--source`): packed rows from the data Loader (`data`, default), or the trunk's own
  continuations of prompts taken from those rows (`self`: sampled at temperature 1 by the engine),
  the text the head will actually draft for;
- targets (`--target`): the trunk's own distribution over token t+2 (`trunk`, default:
  KL(p_trunk || q_head), i.e. distillation; the acceptance of lossless speculative sampling is
  sum min(p, q) = 1 - TV(p, q), which this drives up directly), or the data's tokens (`tokens`:
  cross-entropy, what joint pre-training uses).

The trunk runs under no_grad (no activations kept for it), so a step costs about one trunk forward
plus the head's forward and backward. Acceptance of greedy MTP speculation is measured before and
after on held-out code (Python files of the installed site-packages, which the embedded corpus
excludes) and written to `mtp_head.json`. The checkpoint with the head is saved atomically
(`mellum2.atomic.atomic_dir`: a temporary sibling renamed into place; files other than the weights,
e.g. a tokenizer, are carried over). Like DeepSeek-V3's and Qwen3-Next's MTP modules, the head sees
h_t and the embedding of x_{t+1}. The head trains with the CPU training attention and fused q/k/v
(`mellum2.kernels.install`; its experts keep torch's grouped_mm).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mellum2 import kernels
from mellum2.atomic import atomic_dir
from mellum2.data import ensure_default_data
from mellum2.data.shards import ShardStore
from mellum2.data.sources import DOMAINS
from mellum2.errors import MellumError, run_stage
from mellum2.infer.engine import Engine
from mellum2.infer.sampling import SamplingParams
from mellum2.locate import DRAFT_VOCAB_FILE, resolve_model_dir, tokenizer_dir
from mellum2.model import Mellum2, load_pretrained
from mellum2.model.mtp import MTP
from mellum2.model.objective import loss_weights, objective, router_losses
from mellum2.model.transformer import init_weights
from mellum2.tokenizer import Tokenizer
from mellum2.tokenizer.special import NUM_SPECIAL

from .data import make_loader
from .runlock import RunLock, sibling_lock_file

WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


class TrainMTPError(MellumError):
    """Bad arguments or data for the MTP-head trainer; the message names which."""


# ---------------------------------------------------------------------------- model
def with_fresh_head(model: Mellum2, seed: int = 0) -> Mellum2:
    """Attach a newly initialised MTP head (init_weights' rules for its tensors, the trunk untouched)."""
    cfg = model.cfg.replace(num_nextn_predict_layers=1)
    w = model.lm_head.weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shim = _Shim(cfg, MTP(cfg))
        init_weights(shim)
    model.mtp = shim.mtp.to(device=w.device, dtype=w.dtype)
    model.cfg = cfg
    return model


class _Shim(nn.Module):
    """Just enough of a Mellum2 for init_weights to initialise an MTP head alone."""

    def __init__(self, cfg, mtp):
        super().__init__()
        self.cfg, self.mtp = cfg, mtp
        self.rotary = SimpleNamespace(reset=lambda: None)


def freeze_trunk(model: Mellum2) -> list[torch.nn.Parameter]:
    """requires_grad only for mtp.*; returns those parameters."""
    train = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("mtp."))
        if p.requires_grad:
            train.append(p)
    return train


def mtp_loss(model: Mellum2, ids_BT, labels_BT, pos_BT=None, target: str = "trunk", autocast=None):
    """The head's loss on one batch with the trunk frozen: (total, {'mtp', 'lb', 'z'})."""
    ctx = autocast or torch.autocast("cpu", enabled=False)
    with ctx:
        with torch.no_grad():
            h_BTD, _ = model.trunk(ids_BT, pos_BT)
            p_logits = model.head(h_BTD[:, 1:]) if target == "trunk" else None  # position t+1 predicts t+2
        y_BTD, routers = model.mtp(model, h_BTD[:, :-1], ids_BT[:, 1:], None if pos_BT is None else pos_BT[:, :-1])
        q_logits = model.mtp.logits(model, y_BTD)  # [B, T-1, V]: position t predicts token t+2
    T = ids_BT.shape[1]
    mask_BT = labels_BT[:, 2:] != -100  # the pair (t, t+2) lies in one document, not padding
    q = q_logits[:, : T - 2].float()
    if target == "trunk":
        lp = p_logits[:, : T - 2].float().log_softmax(-1)
        kl = (lp.exp() * (lp - q.log_softmax(-1))).sum(-1)
        main = (kl * mask_BT).sum() / mask_BT.sum().clamp(min=1)
    else:
        main = F.cross_entropy(q.reshape(-1, q.shape[-1]), labels_BT[:, 2:].reshape(-1), ignore_index=-100)
    losses = {"mtp": main, **router_losses(routers, model.cfg.num_experts)}
    # the head's own loss has weight 1 here (in joint pre-training it is mtp_loss_weight next to the CE)
    return objective(losses, {**loss_weights(model.cfg), "mtp": 1}), losses


# ---------------------------------------------------------------------------- data
def data_batches(data: str | None, vocab_size: int, batch_size: int, seq_len: int, steps: int, seed: int):
    """Loader rows (the trainer's make_loader: a prepared directory, 'synthetic', or the default)."""
    loader, _ = make_loader(data, vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len,
                            total_tokens=batch_size * seq_len * (steps + 1), rank=0, world_size=1, seed=seed)
    return iter(loader)


def self_batches(model: Mellum2, batches, prompt_len: int, seq_len: int, seed: int):
    """The trunk's own continuations (temperature 1) of the first prompt_len tokens of each row."""
    eng = Engine(model)
    for i, b in enumerate(batches):
        prompts = b["input_ids"][:, :prompt_len].tolist()
        params = [SamplingParams(max_new_tokens=seq_len - prompt_len, temperature=1.0, seed=seed * 100003 + i * 997 + r,
                                 ignore_eos=True) for r in range(len(prompts))]
        res = eng.generate(prompts, params)
        ids = torch.tensor([p + r.tokens for p, r in zip(prompts, res)])
        yield {"input_ids": ids, "labels": ids.clone(), "position_ids": None}


def draft_vocab_from_data(data_dir, n: int) -> list[int]:
    """The n most frequent token ids of a prepared data directory (all domains), special ids first:
    the draft vocabulary of FR-Spec-style trimmed drafting (forward.Fast.set_draft_vocab)."""
    store = ShardStore(data_dir)
    counts = None
    for d in DOMAINS:
        for i in range(store.n_docs(d)):
            c = np.bincount(np.asarray(store.doc(d, i), dtype=np.int64))
            counts = c if counts is None else np.pad(counts, (0, max(0, len(c) - len(counts)))) + \
                np.pad(c, (0, max(0, len(counts) - len(c))))
    if counts is None:
        raise TrainMTPError(f"{data_dir}: no tokens to count for a draft vocabulary")
    special = list(range(NUM_SPECIAL))  # mellum2.tokenizer.special: ids 0..32
    rest = [int(t) for t in np.argsort(-counts, kind="stable") if t >= NUM_SPECIAL]
    return (special + rest)[:n]


def heldout_code_prompts(tokenizer, n: int = 16, prompt_tokens: int = 64, seed: int = 0,
                         root: str | None = None) -> list[list[int]]:
    """Prompts from Python files the embedded corpus never saw (site-packages), chosen by a stable
    hash: n files, each cut at a line start a third of the way in, prompt_tokens tokens ending there."""
    if n <= 0:
        return []
    base = Path(root or sysconfig.get_paths()["purelib"])
    files = sorted(p for p in base.rglob("*.py") if p.stat().st_size > 4000 and "test" not in p.name)
    key = lambda p: hashlib.sha1(f"{seed}:{p.relative_to(base)}".encode()).hexdigest()  # noqa: E731
    out = []
    for f in sorted(files, key=key):
        text = f.read_text(errors="replace")
        cut = text.find("\n", len(text) // 3) + 1
        ids = tokenizer.encode(text[:cut], allow_special=False)
        if len(ids) >= prompt_tokens:
            out.append([tokenizer.bos_id] + ids[-(prompt_tokens - 1):])
        if len(out) == n:
            break
    if len(out) < n:
        raise TrainMTPError(f"only {len(out)} Python files of >= {prompt_tokens} tokens under {base}")
    return out


def measure_acceptance(model: Mellum2, prompts: list[list[int]], max_new_tokens: int = 64, draft_tokens: int = 1):
    """Acceptance and mean accepted length of greedy MTP speculation over the prompts (one batch)."""
    res = Engine(model).generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
                                 speculative=True, draft_tokens=draft_tokens)
    s = res[0].stats
    return {"acceptance": s.acceptance, "mean_accepted_length": s.mean_accepted_length, "drafted": s.drafted}


# ---------------------------------------------------------------------------- the recipe
def train_head(model: Mellum2, batches, steps: int, lr: float = 1e-3, warmup: int = 20, target: str = "trunk",
               precision: str = "bf16", log_every: int = 25, say=print) -> list[dict]:
    """Train mtp.* for `steps` batches (AdamW, linear warmup, cosine decay to 10%); returns the log."""
    params = freeze_trunk(model)
    kernels.install(model, experts=False)
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    def sched(s):
        return min(1.0, (s + 1) / max(1, warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))

    dev = model.lm_head.weight.device
    ac = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else None
    log, t0, ntok = [], time.perf_counter(), 0
    for step in range(steps):
        b = next(batches)
        ids = b["input_ids"].to(dev)
        pos = b.get("position_ids")
        for g in opt.param_groups:
            g["lr"] = lr * sched(step)
        loss, losses = mtp_loss(model, ids, b["labels"].to(dev), None if pos is None else pos.to(dev), target, ac)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ntok += ids.numel()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rec = {"step": step + 1, **{k: round(float(v.detach()), 4) for k, v in losses.items()},
                   "lr": lr * sched(step), "tok_per_s": round(ntok / (time.perf_counter() - t0))}
            log.append(rec)
            say(json.dumps(rec))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return log


def save_with_head(model: Mellum2, src: Path, out: Path, extra: dict[str, str] | None = None) -> None:
    """Atomically write the checkpoint (fp32, as loaded) with `extra` files (name -> text); carry over
    the source directory's other files (a tokenizer, notes)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / "ckpt")
        for f in src.iterdir():
            if f.name not in WEIGHT_FILES and not f.name.startswith("model-") and f.name not in (extra or {}):
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / "ckpt" / f.name)
        for name, text in (extra or {}).items():
            (tmp / "ckpt" / name).write_text(text)
        for f in (tmp / "ckpt").iterdir():  # the checkpoint is the directory itself, not a ckpt/ in it
            f.rename(tmp / f.name)
        (tmp / "ckpt").rmdir()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mellum2 train-mtp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="checkpoint directory or training run directory")
    a("--out", default=None, help="where to write the checkpoint with the head (default: MODEL-mtp beside --model; "
      "never a training run's checkpoint, whose optimiser state would no longer match)")
    a("--data", default=None, help="prepared data directory or 'synthetic' (default: the embedded corpus)")
    a("--source", choices=("data", "self"), default="data", help="train on data rows or the trunk's own text")
    a("--target", choices=("trunk", "tokens"), default="trunk", help="distil the trunk's t+2 distribution, or CE")
    a("--steps", type=int, default=300)
    a("--batch-size", type=int, default=8)
    a("--seq-len", type=int, default=512)
    a("--prompt-len", type=int, default=64, help="with --source self: prompt tokens per row")
    a("--lr", type=float, default=2e-3)
    a("--warmup", type=int, default=20)
    a("--reinit", action="store_true", help="start from a fresh head even if the checkpoint has one")
    a("--precision", choices=("bf16", "fp32"), default="bf16")
    a("--draft-vocab", type=int, default=-1, help="also write draft_vocab.json with the N most frequent ids of the "
      "data (FR-Spec-style cheap drafts); -1: vocab_size // 8, 0: none")
    a("--eval-prompts", type=int, default=16, help="held-out code prompts for the acceptance figure (0: skip)")
    a("--log-every", type=int, default=25)
    a("--seed", type=int, default=1)
    a("--threads", type=int, default=None)
    return p


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("steps", "batch_size", "seq_len", "log_every"):
        if getattr(args, name) < 1:
            raise TrainMTPError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    src = resolve_model_dir(args.model, "--model")
    out = Path(args.out) if args.out else default_out(args.model)
    if in_training_checkpoint(out):
        raise TrainMTPError(f"--out {out}: inside a training run's checkpoint; writing there would leave its weights "
                            f"out of step with its optimiser state (a later --resume would continue from them); "
                            f"choose another --out")
    with RunLock(out.parent, lock_file=sibling_lock_file(out)):  # one writer of `out` at a time
        return _run(args, src, out)


def default_out(model_arg) -> Path:
    """`--model runs/tiny` -> runs/tiny-mtp: a new directory beside the source, never the source."""
    p = Path(model_arg)
    return p.with_name(p.resolve().name + "-mtp")


def in_training_checkpoint(path: Path) -> bool:
    """Whether `path` is (in) a `mellum2 train` checkpoint: OUT/checkpoints/step_N/..."""
    p = path.resolve()
    return any(a.parent.name == "checkpoints" and re.match(r"^step_\d{8}$", a.name) for a in (p, *p.parents))


def _run(args, src: Path, out: Path) -> dict:
    model = load_pretrained(src, dtype=torch.float32)
    if args.seq_len > model.cfg.max_position_embeddings or (args.source == "self" and args.prompt_len >= args.seq_len):
        raise TrainMTPError(f"--seq-len {args.seq_len} / --prompt-len {args.prompt_len}: need prompt-len < seq-len "
                            f"<= max_position_embeddings ({model.cfg.max_position_embeddings})")
    had = model.mtp is not None
    if not had or args.reinit:
        model = with_fresh_head(model)
    state = ("had a head" + (", reinitialised" if args.reinit else "")) if had else "no head: added one"
    print(f"mellum2 train-mtp: {src} ({state}"
          f", {model.num_params('mtp') / 1e6:.2f}M head parameters; trunk frozen), {args.steps} steps of "
          f"{args.batch_size}x{args.seq_len}, source {args.source}, target {args.target} -> {out}")
    prompts = None
    if args.eval_prompts:
        try:
            tok = Tokenizer.load(tokenizer_dir(src))
            prompts = heldout_code_prompts(tok, args.eval_prompts)
        except MellumError as e:
            print(f"note: no held-out acceptance figure ({e})")
    before = measure_acceptance(model, prompts) if prompts else None
    if before:
        print(f"acceptance on held-out code before: {before['acceptance']:.3f}")
    batches = data_batches(args.data, model.cfg.vocab_size, args.batch_size, args.seq_len, args.steps, args.seed)
    if args.source == "self":
        batches = self_batches(model, batches, args.prompt_len, args.seq_len, args.seed)
    log = train_head(model, batches, args.steps, args.lr, args.warmup, args.target, args.precision, args.log_every)
    after = measure_acceptance(model, prompts) if prompts else None
    if after:
        print(f"acceptance on held-out code after: {after['acceptance']:.3f} "
              f"(mean accepted length {after['mean_accepted_length']:.2f})")
    summary = {"model": str(src), "out": str(out), "args": vars(args), "had_head": had, "before": before,
               "after": after, "log": log}
    extra = {"mtp_head.json": json.dumps(summary, indent=1, default=str) + "\n"}
    n_vocab = model.cfg.vocab_size // 8 if args.draft_vocab < 0 else args.draft_vocab
    if n_vocab and args.data != "synthetic":
        ids = draft_vocab_from_data(args.data or ensure_default_data(progress=False), n_vocab)
        extra[DRAFT_VOCAB_FILE] = json.dumps({"ids": ids, "source": str(args.data or "default data")}) + "\n"
    save_with_head(model, src, out, extra)
    print(f"saved {out}" + ("" if out == src else f" (the source {src} is unchanged; use --model {out} for drafting)"))
    return summary


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("train-mtp", main))
