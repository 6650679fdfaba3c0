"""The run around the `Trainer`: restore, the step loop with logging and checkpoints, and the end of a
run. Shared by every stage that trains the whole model (pre-training, the long-context stage, SFT),
so they checkpoint, resume, log and stop the same way.

A stage builds its own pieces (the model, `parallelize`, `build_optimizers`, a schedule, a loader
that yields `input_ids` / `labels` / `position_ids` batches and has `state_dict` / `load_state_dict`)
and a `Trainer`, then:

    run = Run(out, trainer, model, optims, loader, schedule, cfg, d, trajectory, keep)
    run.restore(found)                # exact resume: optimiser, loader, trainer, RNG of every rank
    run.loop(total_steps, logger, log_every, save_every)   # ends with the final checkpoint
    summary = run.finish(boundaries_steps)                  # loss.png, summary.json

Exactness: a checkpoint holds everything the trajectory depends on (weights, optimiser state, each
rank's loader position and RNG states, the trainer's counters) plus `trajectory`, the settings that
decide it, which `restore` checks against the resuming run's (ckpt.check_compatible).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mellum2 import atomic
from mellum2.errors import DiskError, describe_os_error

from . import checkpoint as ckpt
from .errors import TrainingDiverged
from .metrics import plot_losses, read_jsonl, summarize
from .parallel import all_gather_objects, barrier, full_model_state, full_optim_state, load_optim_state


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def write_json(path: Path, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


@dataclass
class Run:
    out: Path
    trainer: object  # trainer.Trainer
    model: torch.nn.Module
    optims: object  # optim.Optimizers
    loader: object
    schedule: object  # has state_dict()
    cfg: object  # the ModelConfig written with every checkpoint
    d: object  # parallel.Dist
    trajectory: dict
    keep: int = 3
    logger: object = None  # metrics.MetricsLogger, set by loop()

    def __post_init__(self):
        self._saved = -1

    def restore(self, found: Path | None) -> None:
        """Continue from checkpoint `found` exactly (nothing when None)."""
        if found is None:
            return
        ts = ckpt.load_train_state(found)
        ckpt.check_compatible(ts["trajectory"], self.trajectory, found)
        load_optim_state(self.model, self.optims.list, ts["optim"], self.d)
        self.loader.load_state_dict(ts["loader"][self.d.rank])
        self.trainer.load_state_dict(ts["trainer"])
        set_rng_state(ts["rng"][self.d.rank])
        self._saved = self.trainer.step

    def save(self) -> None:
        """Checkpoint the current step (once per step; every rank calls it). Not after non-finite steps:
        "last good checkpoint" must mean good."""
        tr, d = self.trainer, self.d
        if self._saved == tr.step:
            return
        if self.logger is not None:
            self.logger.log_steps(tr.drain())
        if tr.bad_streak:  # the weights are the last applied step's, but the state is not a good one
            if d.is_main:
                print(f"note: no checkpoint at step {tr.step}: its last {tr.bad_streak} step(s) were non-finite "
                      f"(last good checkpoint: {ckpt.last_good(self.out) or 'none'})")
            return
        self._saved = tr.step
        model_state = full_model_state(self.model, d)
        optim_state = full_optim_state(self.model, self.optims.list, d)
        loaders, rngs = all_gather_objects(self.loader.state_dict(), d), all_gather_objects(rng_state(), d)
        if d.is_main:
            state = {"format": ckpt.FORMAT, "trainer": tr.state_dict(), "optim": optim_state,
                     "loader": loaders, "rng": rngs, "trajectory": self.trajectory,
                     "schedule": self.schedule.state_dict()}
            ckpt.save(self.out, tr.step, tr.tokens, cfg=self.cfg, model_state=model_state, train_state=state,
                      keep=self.keep)
        barrier(d)

    def loop(self, total_steps: int, logger, log_every: int, save_every: int = 0) -> None:
        """Train to `total_steps`, logging every `log_every` steps and checkpointing every `save_every`
        (0: only at the end). Divergence raises TrainingDiverged naming the last good checkpoint."""
        self.logger, tr = logger, self.trainer
        try:
            while tr.step < total_steps:
                tr.train_step()
                if tr.step % log_every == 0:
                    logger.log_steps(tr.drain())
                if save_every and tr.step % save_every == 0 and tr.step < total_steps:
                    self.save()
            self.save()
        except TrainingDiverged as e:
            logger.log_steps(tr.drain())
            raise TrainingDiverged(f"{e}; last good checkpoint: {ckpt.last_good(self.out) or 'none'}") from None
        except OSError as e:  # a full disk or lost permissions while logging
            last = ckpt.list_checkpoints(self.out)
            raise DiskError(f"{describe_os_error(e)}; training stopped at step {tr.step}, last saved checkpoint: "
                            f"{last[-1][1] if last else 'none'}") from None
        finally:
            logger.close()

    def finish(self, boundaries_steps: list[int], label: str = "phase") -> dict | None:
        """loss.png and summary.json from metrics.jsonl (rank 0; None elsewhere). `boundaries_steps`:
        where phases (or epochs) 2.. start, then the end, in finished steps."""
        if not self.d.is_main:
            return None
        recs = read_jsonl(self.out / "metrics.jsonl")
        plot_losses(self.out / "metrics.jsonl", self.out / "loss.png", boundaries_steps, label)
        summary = summarize(recs, boundaries_steps)
        write_json(self.out / "summary.json", summary)
        return summary
