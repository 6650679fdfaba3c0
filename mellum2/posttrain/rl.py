"""`mellum2 rl`: reinforcement learning with verifiable rewards, Mellum 2's GRPO variant (docs/rl.md).

    mellum2 rl --from runs/sft-instruct --tasks math,json --out runs/rl --steps 40
    mellum2 rl --from runs/sft-instruct --tasks math,json --out runs/rl --resume

A linear recipe: the policy from an SFT run -> the task pools (embedded RL tasks, train and the fixed
held-out split) -> held-out evaluation (greedy, mean reward and a 95% bootstrap interval) -> loop:
  1. take ceil(oversample x P) prompts, G samples each from the engine (rollout.py)
  2. dynamic sampling: keep the first P groups whose rewards differ (grpo.select_groups)
  3. leave-one-out advantages; the trainer's logprobs of the sampled tokens under the sampling
     weights (pi_train_old, one no-grad pass: IcePop's numerator)
  4. `--minibatches` AdamW steps over the batch (constant learning rate), each the GRPO loss
     (grpo.grpo_loss, token-normalised over the minibatch) + the MoE router terms of the one objective
     (mellum2/model/objective.py, weights from the model config, as in SFT)
  5. log (metrics.jsonl), evaluate every `--eval-every`, checkpoint every `--save-every`
-> held-out evaluation again, summary.json (before / after / paired difference), rl.png.

Rollouts are synchronous (staleness 0, checked per step against `MAX_STALENESS`): on a CPU the
sampler and the trainer share the cores, so running one ahead buys nothing. The MTP head is not
trained (the report says nothing of it in RL); it is saved as loaded.

Checkpoints, metrics and resume are the pre-trainer's (mellum2/train/checkpoint.py, metrics.py):
the model, AdamW's state, the prompt sampler's position, the RNG states and the arguments that decide
the trajectory; sampling seeds derive from (seed, step, prompt, sample), so a resumed run is the
uninterrupted one, bit for bit.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from pathlib import Path

import torch

from mellum2 import atomic
from mellum2.errors import UsageError
from mellum2.infer import Engine
from mellum2.locate import resolve_model_dir, tokenizer_dir
from mellum2.model import load_pretrained
from mellum2.model.objective import StepShare, loss_weights, objective, router_losses
from mellum2.tokenizer import Tokenizer
from mellum2.train import checkpoint as ckpt
from mellum2.train.loop import rng_state, set_rng_state, write_json
from mellum2.train.metrics import MetricsLogger, read_jsonl, truncate_jsonl
from mellum2.train.optim import clip_grad_norm
from mellum2.train.errors import TrainError
from mellum2.train.runlock import RunLock

from .grpo import EPS_HIGH, EPS_LOW, ICEPOP, entropy, grpo_loss, loo_advantages, select_groups, token_logprobs
from .rltasks import KINDS, rl_tasks
from .rollout import evaluate, paired_diff_ci, prompt_of, rollout
from .verify import score

MAX_STALENESS = 0  # synchronous rollouts (module docstring); the report allows up to 2
DEFAULT_LR = 3e-5  # the demo-scale SFT model, a 15-minute run (docs/rl.md); the report's 1e-6 is for the 12B model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mellum2 rl", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--from", dest="from_", required=True, metavar="SFT_RUN", help="SFT run or checkpoint directory")
    a("--tasks", default=",".join(KINDS), help=f"comma-separated task kinds ({', '.join(KINDS)})")
    a("--difficulty", default=None, help="task levels, e.g. 1 or 1,2 (default: all, mixed 4:4:2)")
    a("--out", required=True, help="output directory")
    a("--steps", type=int, default=40, help="RL steps (rollout batches)")
    a("--prompts", type=int, default=8, help="P: prompts (groups) trained on per step")
    a("--group", type=int, default=8, help="G: samples per prompt")
    a("--oversample", type=float, default=1.5, help="prompts sampled per step = ceil(oversample x P)")
    a("--minibatches", type=int, default=2, help="optimiser steps per rollout batch")
    a("--micro-batch", type=int, default=16, help="sequences per forward pass")
    a("--max-new-tokens", type=int, default=96, help="length cap of a reply (over it: dropped)")
    a("--overlong-buffer", type=int, default=24, help="tokens before the cap where the soft penalty grows")
    a("--overlong-floor", type=float, default=1.0, help="the penalty at the cap")
    a("--lr", type=float, default=DEFAULT_LR, help="constant AdamW learning rate")
    a("--weight-decay", type=float, default=0.0)
    a("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    a("--eps-low", type=float, default=EPS_LOW)
    a("--eps-high", type=float, default=EPS_HIGH)
    a("--icepop", type=float, nargs=2, default=list(ICEPOP), metavar=("LO", "HI"), help="IcePop band of rho")
    a("--precision", choices=("bf16", "fp32"), default="fp32",
      help="the trainer's autocast (fp32 masters; the sampler runs the fp32 weights)")
    a("--thinking", action="store_true", help="sample with reasoning on (the Thinking variant)")
    a("--train-tasks", type=int, default=2000, help="size of the training task pool")
    a("--heldout", type=int, default=200, help="held-out tasks evaluated (a fixed set)")
    a("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: before and after only)")
    a("--time-limit", type=float, default=0, help="minutes of training (0: none): the loop stops before a step "
                                                   "that would end past it; held-out evaluations are not counted")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep", type=int, default=2, help="checkpoints kept")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    a("--no-tensorboard", action="store_true")
    a("--no-progress", action="store_true")
    return p


def _check(args) -> tuple[list[str], object]:
    kinds = [k.strip() for k in args.tasks.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise UsageError(f"--tasks {args.tasks!r}: expected a comma-separated subset of {', '.join(KINDS)}")
    diff = None
    if args.difficulty:
        try:
            diff = tuple(int(x) for x in args.difficulty.split(","))
        except ValueError:
            diff = None
        if not diff or any(d not in (1, 2, 3) for d in diff):
            raise UsageError(f"--difficulty {args.difficulty!r}: expected levels 1, 2, 3, comma-separated")
    for name in ("steps", "prompts", "minibatches", "micro_batch", "max_new_tokens", "train_tasks", "heldout", "keep"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.group < 2:
        raise UsageError(f"--group: expected >= 2 (leave-one-out needs two samples), got {args.group}")
    if not args.oversample >= 1:
        raise UsageError(f"--oversample: expected >= 1, got {args.oversample}")
    if not 0 <= args.overlong_buffer < args.max_new_tokens:
        raise UsageError(f"--overlong-buffer: expected 0 <= buffer < --max-new-tokens, got {args.overlong_buffer}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr: expected a positive number, got {args.lr}")
    lo, hi = args.icepop
    if not 0 < lo <= 1 <= hi:
        raise UsageError(f"--icepop {lo} {hi}: expected 0 < LO <= 1 <= HI")
    for name in ("eval_every", "save_every", "time_limit", "weight_decay", "clip", "eps_low", "eps_high"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")
    return kinds, diff


class TaskSampler:
    """Prompts in a seeded random order, epoch after epoch; its state is two ints (for resume)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(self.n))
        random.Random(f"{self.seed}:rl-order:{self.epoch}").shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])
        self._order = self._perm()


# ------------------------------------------------------------------------------------ the batch
def build_batch(groups) -> list[dict]:
    """One row per kept sample of the kept groups: ids, where the response starts, its sampler
    logprobs and the leave-one-out advantage."""
    rows = []
    for g in groups:
        kept = g.kept
        adv = loo_advantages([s.reward for s in kept]).tolist()
        for s, a in zip(kept, adv):
            rows.append({"ids": g.prompt + s.tokens, "start": len(g.prompt), "logp_infer": s.logprobs, "adv": a})
    return rows


def _pad(rows: list[dict], device) -> dict[str, torch.Tensor]:
    """Right-padded ids [b, L] and, over target positions t (predicting ids[t + 1]) [b, L-1]: the
    response mask, the sampler's logprobs, the targets; advantages [b]."""
    L = max(len(r["ids"]) for r in rows)
    b = len(rows)
    ids = torch.zeros(b, L, dtype=torch.long)
    mask = torch.zeros(b, L - 1)
    lp_inf = torch.zeros(b, L - 1)
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, :n] = torch.tensor(r["ids"])
        ids[i, n:] = r["ids"][-1]
        a, e = r["start"] - 1, n - 1  # target positions of the response tokens
        mask[i, a:e] = 1
        lp_inf[i, a:e] = torch.tensor(r["logp_infer"])
    adv = torch.tensor([r["adv"] for r in rows])
    return {k: v.to(device) for k, v in dict(ids=ids, mask=mask, logp_infer=lp_inf, adv=adv).items()}


def autocast(model, precision: str):
    """The trainer's precision: bf16 autocast (as pre-training) or plain fp32."""
    if precision == "bf16":
        return torch.autocast(model.lm_head.weight.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def old_logprobs(model, rows: list[dict], micro: int, precision: str = "fp32") -> tuple[list[torch.Tensor], float, float]:
    """pi_train_old of each row's response tokens (the trainer's numerics, the sampling weights), and
    the summed entropy and token count of the policy over those positions."""
    out, ent, n = [], 0.0, 0.0
    for a in range(0, len(rows), micro):
        chunk = rows[a:a + micro]
        t = _pad(chunk, model.lm_head.weight.device)
        with autocast(model, precision):
            logits = model(t["ids"], mtp=False).logits[:, :-1]
        lp = token_logprobs(logits, t["ids"][:, 1:])
        ent += float((entropy(logits) * t["mask"]).sum())
        n += float(t["mask"].sum())
        for i, r in enumerate(chunk):
            out.append(lp[i, r["start"] - 1:len(r["ids"]) - 1].clone())
    return out, ent, n


def train_minibatch(model, opt, rows: list[dict], old: list[torch.Tensor], micro: int, args) -> dict:
    """One AdamW step on `rows`: GRPO loss (token-normalised over the minibatch) + router terms."""
    dev = model.lm_head.weight.device
    weights = loss_weights(model.cfg)
    n_tok = sum(len(r["ids"]) - r["start"] for r in rows)
    K = -(-len(rows) // micro)
    sums = {"tokens": 0.0, "icepop_masked": 0.0, "clipped": 0.0, "clipped_high": 0.0, "clipped_low": 0.0,
            "loss": 0.0}
    for a in range(0, len(rows), micro):
        chunk, olds = rows[a:a + micro], old[a:a + micro]
        t = _pad(chunk, dev)
        lp_old = torch.zeros_like(t["logp_infer"])
        for i, (r, o) in enumerate(zip(chunk, olds)):
            lp_old[i, r["start"] - 1:len(r["ids"]) - 1] = o
        with autocast(model, args.precision):
            out = model(t["ids"], mtp=False)
        logp = token_logprobs(out.logits[:, :-1], t["ids"][:, 1:])
        pg, st = grpo_loss(logp, lp_old, t["logp_infer"], t["adv"], t["mask"], args.eps_low, args.eps_high,
                           tuple(args.icepop), num_tokens=n_tok)
        aux = router_losses(out.routers, model.cfg.num_experts, model.count_reducer)
        loss = pg + (objective(aux, weights, StepShare({}, {}, 1, K)) if aux else 0.0)
        loss.backward()
        for k, v in st.items():
            sums[k] += float(v)
        sums["loss"] += float(pg.detach())
    norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], args.clip or float("inf"))
    if torch.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    sums["grad_norm"] = float(norm)
    return sums


# ------------------------------------------------------------------------------------ the run
def _eval(engine, tok, heldout, args, step: int, out: Path, say, scorer) -> dict:
    t0 = time.perf_counter()
    res = evaluate(engine, tok, heldout, max_new_tokens=args.max_new_tokens, thinking=args.thinking, scorer=scorer)
    rec = {"step": step, **res.summary(), "eval_s": time.perf_counter() - t0, "rewards": res.rewards}
    with open(out / "eval.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    lo, hi = rec["ci95"]
    say(f"held-out @ step {step}: mean reward {rec['mean']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={rec['n']}), "
        f"pass {rec['pass_rate']:.3f}, by kind {json.dumps({k: round(v, 3) for k, v in rec['by_kind'].items()})}")
    return rec


def run(args, scorer=score) -> Path:
    """The run of parsed `args`; `scorer(task, message) -> (reward, reason)` is the verifier (tests
    pass their own)."""
    t_start = time.perf_counter()
    kinds, diff = _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = print
    out = Path(args.out)
    found = ckpt.newest_verified(out, say) if args.resume else None  # a damaged newer one: named, set aside
    if args.resume and found is None:
        raise TrainError(f"--resume: no finished checkpoint in {ckpt.checkpoints_root(out)}")
    if not args.resume and ckpt.list_checkpoints(out):
        raise TrainError(f"{out} already holds checkpoints; pass --resume to continue it or choose another --out")
    src = resolve_model_dir(args.from_, "--from")
    tok = Tokenizer.load(tokenizer_dir(src))
    out.mkdir(parents=True, exist_ok=True)

    # ---- tasks
    train_pool = rl_tasks("train", kinds, n=args.train_tasks, seed=args.seed, difficulty=diff)
    heldout = rl_tasks("heldout", kinds, n=args.heldout, seed=0, difficulty=diff)

    # ---- policy, engine, optimiser
    model = ckpt.load_model(found) if found is not None else load_pretrained(src, dtype=torch.float32).train()
    cfg = model.cfg
    for t in heldout + train_pool[:50]:
        n = len(prompt_of(tok, t, args.thinking)[0]) + args.max_new_tokens
        if n > cfg.max_position_embeddings:
            raise UsageError(f"task {t['id']}: prompt + --max-new-tokens = {n} tokens exceeds the model's "
                             f"context ({cfg.max_position_embeddings}); lower --max-new-tokens")
    if model.mtp is not None:
        model.mtp.requires_grad_(False)  # not trained in RL (module docstring)
    engine = Engine(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay)
    trajectory = {k: getattr(args, k) for k in (
        "tasks", "difficulty", "prompts", "group", "oversample", "minibatches", "micro_batch", "max_new_tokens",
        "overlong_buffer", "overlong_floor", "lr", "weight_decay", "clip", "eps_low", "eps_high", "thinking",
        "train_tasks", "heldout", "seed", "precision")}
    trajectory["icepop"] = list(args.icepop)
    trajectory["source"] = str(src.resolve())
    sampler = TaskSampler(len(train_pool), args.seed)
    step, tokens = 0, 0
    if found is not None:
        ts = ckpt.load_train_state(found)
        ckpt.check_compatible(ts["trajectory"], trajectory, found)
        opt.load_state_dict(ts["optim"])
        sampler.load_state_dict(ts["sampler"])
        step, tokens = int(ts["trainer"]["step"]), int(ts["trainer"]["tokens"])
        set_rng_state(ts["rng"])
        say(f"resumed from {found} at step {step}")
    if not (out / "tokenizer").exists():
        with atomic.atomic_dir(out / "tokenizer") as tmp:
            tok.save(tmp)
    write_json(out / "args.json", {**vars(args), "trajectory": trajectory})
    truncate_jsonl(out / "eval.jsonl", step)

    def save() -> None:
        state = {"format": ckpt.FORMAT, "trainer": {"step": step, "tokens": tokens}, "optim": opt.state_dict(),
                 "sampler": sampler.state_dict(), "rng": rng_state(), "trajectory": trajectory}
        ckpt.save(out, step, tokens, cfg=cfg, model_state=model.state_dict(), train_state=state, keep=args.keep)

    n_sample = math.ceil(args.oversample * args.prompts)
    say(f"mellum2 rl: {src} -> {out}; tasks {','.join(kinds)} (difficulty {args.difficulty or 'all'}), "
        f"{len(train_pool)} train / {len(heldout)} held-out; {args.steps} steps x {args.prompts} prompts "
        f"(sampling {n_sample}) x G={args.group}, lr {args.lr:g}, cap {args.max_new_tokens} tokens")
    evals = read_jsonl(out / "eval.jsonl") if (out / "eval.jsonl").exists() else []
    if not any(e["step"] == step for e in evals):
        evals.append(_eval(engine, tok, heldout, args, step, out, say, scorer))
    logger = MetricsLogger(out, enabled=True, total_steps=args.steps, start_step=step, start_tokens=tokens,
                           flops_per_token=0.0, peak_flops=None, tensorboard=not args.no_tensorboard,
                           progress=not args.no_progress)
    step_s = []
    try:
        while step < args.steps:
            if args.time_limit and step_s and sum(step_s) + max(step_s) > args.time_limit * 60:
                say(f"--time-limit {args.time_limit:g} min: stopping after step {step}")
                break
            t0 = time.perf_counter()
            rec = rl_step(model, engine, opt, tok, train_pool, sampler, step, args, n_sample, scorer)
            step += 1
            tokens += rec["train_tokens"]
            rec.update(step=step, tokens=tokens, lr=args.lr, step_s=time.perf_counter() - t0)
            step_s.append(rec["step_s"])
            logger.log_steps([rec])
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                evals.append(_eval(engine, tok, heldout, args, step, out, say, scorer))
            if args.save_every and step % args.save_every == 0:
                save()
    finally:
        logger.close()
    if not ckpt.list_checkpoints(out) or ckpt.list_checkpoints(out)[-1][0] != step:
        save()
    if evals[-1]["step"] != step:
        evals.append(_eval(engine, tok, heldout, args, step, out, say, scorer))
    first, last = evals[0], evals[-1]
    diff_mean, lo, hi = paired_diff_ci(first["rewards"], last["rewards"])
    summary = {"before": {k: v for k, v in first.items() if k != "rewards"},
               "after": {k: v for k, v in last.items() if k != "rewards"},
               "paired_difference": {"mean": diff_mean, "ci95": [lo, hi]}, "steps": step,
               "train_minutes": sum(step_s) / 60, "minutes": (time.perf_counter() - t_start) / 60}
    write_json(out / "summary.json", summary)
    say(json.dumps({k: summary[k] for k in ("paired_difference", "steps")}))
    plot_rl(out)
    return out


def rl_step(model, engine, opt, tok, pool, sampler, step: int, args, n_sample: int, scorer=score) -> dict:
    """One RL step (the module docstring's 1-4); returns its metrics."""
    t0 = time.perf_counter()
    idx = sampler.take(n_sample)
    groups = rollout(engine, tok, [pool[i] for i in idx], args.group, seed=args.seed, step=step,
                     max_new_tokens=args.max_new_tokens, overlong_buffer=args.overlong_buffer,
                     overlong_floor=args.overlong_floor, thinking=args.thinking, version=step, scorer=scorer)
    stale = max(step - g.version for g in groups)
    if stale > MAX_STALENESS:
        raise AssertionError(f"rollouts {stale} steps stale (at most {MAX_STALENESS})")
    t_roll = time.perf_counter() - t0
    samples = [s for g in groups for s in g.samples]
    kept, dropped, unused = select_groups(groups, args.prompts)
    live = [s for s in samples if s.dropped is None] or [None]
    rec = {"reward": sum(s.reward for s in live if s) / len(live),  # shaped, over the samples not dropped
           "score": sum(s.score for s in samples) / len(samples),
           "pass_rate": sum(s.score >= 1 for s in samples) / len(samples),
           "response_length": sum(len(s.tokens) for s in samples) / len(samples),
           "overlong_dropped": sum(s.dropped == "overlong" for s in samples),
           "verifier_dropped": sum(s.dropped == "verifier" for s in samples),
           "reflections": sum(s.reflections for s in samples) / len(samples),
           "groups_sampled": len(groups), "zero_variance_dropped": dropped, "groups_used": len(kept),
           "surplus_unused": unused, "staleness": stale, "rollout_s": t_roll}
    rows = build_batch(kept)
    rec["train_tokens"] = sum(len(r["ids"]) - r["start"] for r in rows)
    if not rows:  # every group agreed: nothing to learn from this step
        rec.update(loss=0.0, clip_frac=0.0, icepop_masked_frac=0.0, entropy=float("nan"), grad_norm=0.0,
                   skipped=True)
        return rec
    old, ent, n_ent = old_logprobs(model, rows, args.micro_batch, args.precision)
    order = list(range(len(rows)))
    random.Random(f"{args.seed}:rl-minibatch:{step}").shuffle(order)
    M = min(args.minibatches, len(rows))
    tot = {}
    for m in range(M):
        sel = order[m::M]
        st = train_minibatch(model, opt, [rows[i] for i in sel], [old[i] for i in sel], args.micro_batch, args)
        for k, v in st.items():
            tot[k] = tot.get(k, 0.0) + v
    rec.update(loss=tot["loss"] / M, grad_norm=tot["grad_norm"] / M, entropy=ent / max(n_ent, 1),
               clip_frac=tot["clipped"] / max(tot["tokens"], 1), clip_high_frac=tot["clipped_high"] / max(tot["tokens"], 1),
               clip_low_frac=tot["clipped_low"] / max(tot["tokens"], 1),
               icepop_masked_frac=tot["icepop_masked"] / max(tot["tokens"], 1), skipped=False,
               train_s=time.perf_counter() - t0 - t_roll)
    return rec


def plot_rl(out: Path) -> None:
    """rl.png: training reward and pass rate per step with the held-out mean (95% CI bars); response
    length; clip and IcePop fractions and entropy."""
    import matplotlib  # heavy, and only for the picture at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    evals = read_jsonl(out / "eval.jsonl") if (out / "eval.jsonl").exists() else []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if recs:
        s = [r["step"] for r in recs]
        ax.plot(s, [r["reward"] for r in recs], label="train reward (shaped)", linewidth=1, alpha=0.6)
        ax.plot(s, [r["pass_rate"] for r in recs], label="train pass rate", linewidth=1, alpha=0.6)
    if evals:
        ax.errorbar([e["step"] for e in evals], [e["mean"] for e in evals],
                    yerr=[[e["mean"] - e["ci95"][0] for e in evals], [e["ci95"][1] - e["mean"] for e in evals]],
                    fmt="o-", color="black", capsize=3, label="held-out reward (95% CI)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    if recs:
        axes[1].plot(s, [r["response_length"] for r in recs], linewidth=1)
        axes[1].set_ylabel("mean response length (tokens)")
        axes[1].set_xlabel("step")
        ax = axes[2]
        for key in ("clip_frac", "icepop_masked_frac"):
            ax.plot(s, [r.get(key, 0.0) for r in recs], label=key, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("fraction of tokens")
        ax2 = ax.twinx()
        ax2.plot(s, [r.get("entropy", float("nan")) for r in recs], color="tab:red", alpha=0.5, linewidth=1)
        ax2.set_ylabel("entropy (nats)", color="tab:red")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(out / "rl.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with RunLock(args.out):  # one writer per run directory (mellum2/train/runlock.py)
        run(args)
    return 0
