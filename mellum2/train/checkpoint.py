"""Training checkpoints: atomic, self-validating, the last k kept, and exact to resume from.

Layout of `OUT/checkpoints/step_00000120/` (the number counts finished optimiser steps):
  model/            the model in the Hugging Face layout (`save_pretrained`, fp32 masters, MTP included),
                    loadable by `load_pretrained` and by transformers (minus the MTP head)
  train_state.pt    optimiser state (keyed by parameter name, unsharded), step, tokens, loader state
                    of every rank, RNG states of every rank, skip counters, and the arguments that
                    decide the trajectory (checked on resume)
  meta.json         written last: step, tokens and the size of every file above

Atomicity: everything is written into a hidden sibling `.step_00000120.tmp`, fsynced, and renamed
into place (`mellum2.atomic.atomic_dir`); only names matching `step_\\d{8}` are ever read, so a run
killed mid-write leaves a hidden directory that is never picked up (and is removed by the next
save). A directory that looks finished but fails validation (a file missing or of the wrong size) is
an error naming the file, never silently skipped: resuming from an older one would later overwrite
the newer steps.

Under FSDP, rank 0 writes what `parallel.full_model_state` / `full_optim_state` gathered.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from mellum2.atomic import atomic_dir
from mellum2.model import Mellum2, load_pretrained

from .errors import TrainError

FORMAT = 1
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoints_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def validate(path: Path) -> dict:
    """meta.json of a finished checkpoint, after checking every file it lists; TrainError otherwise."""
    meta_f = path / "meta.json"
    if not meta_f.exists():
        raise TrainError(f"{path}: no meta.json: not a finished checkpoint (move it away to resume from an older one)")
    try:
        meta = json.loads(meta_f.read_text())
        files, step = meta["files"], int(meta["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TrainError(f"{meta_f}: malformed ({e}); expected an object with 'step' and 'files'") from None
    if meta.get("format") != FORMAT:
        raise TrainError(f"{meta_f}: format {meta.get('format')!r}, this trainer reads format {FORMAT}")
    for rel, size in files.items():
        f = path / rel
        if not f.exists():
            raise TrainError(f"{f}: missing (listed in {meta_f})")
        if f.stat().st_size != size:
            raise TrainError(f"{f}: {f.stat().st_size} bytes, {meta_f} says {size} (truncated or replaced)")
    if _NAME.match(path.name) and int(_NAME.match(path.name).group(1)) != step:
        raise TrainError(f"{meta_f}: step {step} does not match the directory name {path.name}")
    return meta


def latest(out_dir: Path) -> Path | None:
    """The newest finished checkpoint (validated), or None when there is none."""
    found = list_checkpoints(out_dir)
    if not found:
        return None
    validate(found[-1][1])
    return found[-1][1]


def save(out_dir: Path, step: int, tokens: int, *, cfg, model_state: dict[str, torch.Tensor], train_state: dict,
         keep: int) -> Path:
    """Write one checkpoint atomically (call on rank 0 only) and prune to the newest `keep`."""
    root = checkpoints_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*"):  # left by a killed run; never a finished checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    with atomic_dir(final) as tmp:
        with torch.device("meta"):
            shell = Mellum2(cfg)
        shell.load_state_dict(model_state, assign=True, strict=True)
        shell.save_pretrained(tmp / "model", dtype=torch.float32)
        torch.save(train_state, tmp / "train_state.pt")
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        meta = {"format": FORMAT, "step": step, "tokens": tokens, "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    for _, old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(path: Path) -> dict:
    f = path / "train_state.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad checkpoint
        raise TrainError(f"{f}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainError(f"{f}: not a format-{FORMAT} train state")
    return state


def load_model(path: Path):
    """The fp32 model of a checkpoint, in training mode (a damaged one raises CheckpointError or
    ConfigError naming the file)."""
    return load_pretrained(path / "model", dtype=torch.float32).train()


def check_compatible(saved: dict, now: dict, path: Path) -> None:
    """The arguments that decide the trajectory must match for an exact resume."""
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in now if saved.get(k) != now.get(k)]
    if diff:
        raise TrainError(f"{path}: cannot resume exactly, these settings differ from the run that wrote it: "
                         + "; ".join(diff))
