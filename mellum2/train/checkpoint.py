"""Training checkpoints: atomic, self-validating, the last k kept, and exact to resume from.

Layout of `OUT/checkpoints/step_00000120/` (the number counts finished optimiser steps):
  model/            the model in the Hugging Face layout (`save_pretrained`, fp32 masters, MTP included),
                    loadable by `load_pretrained` and by transformers (minus the MTP head)
  train_state.pt    optimiser state (keyed by parameter name, unsharded), step, tokens, loader state
                    of every rank, RNG states of every rank, skip counters, and the arguments that
                    decide the trajectory (checked on resume)
  meta.json         written last: step, tokens, the size and SHA-256 of every file above, whether the
                    training state was finite (no non-finite step pending, every weight finite), and
                    the SHA-256 of meta.json's own content

Atomicity: everything is written into a hidden sibling `.step_00000120.tmp`, fsynced, and renamed
into place (`mellum2.atomic.atomic_dir`); only names matching `step_\\d{8}` are ever read, so a run
killed mid-write leaves a hidden directory that is never picked up (and is removed by the next
save).

Content: `verify` re-hashes every file (streamed, 8 MiB at a time) and compares size and digest with
meta.json, so one flipped bit anywhere in a checkpoint is found before it is loaded. `--resume` takes
the newest checkpoint that verifies (`newest_verified`); a damaged newer one is named in one line and
moved aside as `checkpoints/damaged-step_N` (kept for inspection, never read, never pruned), so the
resumed run rewrites those steps, bit for bit as they would have been. With no verified checkpoint
left, resuming is an error naming every damaged file.

Pruning keeps the newest `keep` checkpoints and, beyond them, the newest one whose training state was
finite ("last good": `last_good`), so a run that diverges never loses its way back. Write failures
(a full disk, permissions, `checkpoints` not being a directory) are a `DiskError` naming the problem
and the last checkpoint that was saved; `check_writable` finds the permanent ones before training.

Under FSDP, rank 0 writes what `parallel.full_model_state` / `full_optim_state` gathered.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from mellum2.atomic import atomic_dir
from mellum2.errors import DiskError, describe_os_error
from mellum2.model import Mellum2, load_pretrained

from .errors import TrainError

FORMAT = 1
_NAME = re.compile(r"^step_(\d{8})$")
DAMAGED_PREFIX = "damaged-"
_CHUNK = 8 << 20


class DamagedCheckpoint(TrainError):
    """A finished checkpoint whose files do not match its meta.json (the message names the file)."""


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


def sha256_file(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_meta(path: Path) -> dict:
    """meta.json of a finished checkpoint, checked for shape and its own digest (not the files)."""
    meta_f = path / "meta.json"
    if not meta_f.exists():
        raise DamagedCheckpoint(f"{path}: no meta.json: not a finished checkpoint")
    try:
        meta = json.loads(meta_f.read_text())
        files, step = meta["files"], int(meta["step"])
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise DamagedCheckpoint(f"{meta_f}: malformed ({e}); expected an object with 'step' and 'files'") from None
    if meta.get("format") != FORMAT:
        raise DamagedCheckpoint(f"{meta_f}: format {meta.get('format')!r}, this trainer reads format {FORMAT}")
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):
        raise DamagedCheckpoint(f"{meta_f}: content does not match its checksum (damaged)")
    if _NAME.match(path.name) and int(_NAME.match(path.name).group(1)) != step:
        raise DamagedCheckpoint(f"{meta_f}: step {step} does not match the directory name {path.name}")
    return meta


def validate(path: Path, checksums: bool = True) -> dict:
    """meta.json of a finished checkpoint, after checking the size and (`checksums`) the SHA-256 of
    every file it lists; DamagedCheckpoint naming the first file that differs otherwise. Checkpoints
    written before checksums existed are checked by size only."""
    meta = read_meta(path)
    sums = meta.get("sha256", {}) if checksums else {}
    for rel, size in meta["files"].items():
        f = path / rel
        if not f.is_file():
            raise DamagedCheckpoint(f"{f}: missing (listed in {path / 'meta.json'})")
        if f.stat().st_size != size:
            raise DamagedCheckpoint(f"{f}: {f.stat().st_size} bytes, meta.json says {size} (truncated or replaced)")
        if rel in sums and sha256_file(f) != sums[rel]:
            raise DamagedCheckpoint(f"{f}: checksum mismatch (the file changed after it was saved: damaged)")
    return meta


def latest(out_dir: Path) -> Path | None:
    """The newest finished checkpoint (verified), or None when there is none; a damaged newest one
    raises DamagedCheckpoint (see `newest_verified` for falling back)."""
    found = list_checkpoints(out_dir)
    if not found:
        return None
    validate(found[-1][1])
    return found[-1][1]


def newest_verified(out_dir: Path, say=print) -> Path | None:
    """The newest checkpoint that verifies; each newer, damaged one is named in one line and moved
    aside (`damaged-step_N`) so the resumed run can rewrite its steps. None when there are none at all;
    TrainError naming every damaged file when none verifies."""
    found = list_checkpoints(out_dir)
    damaged = []
    for _, path in reversed(found):
        try:
            validate(path)
        except DamagedCheckpoint as e:
            damaged.append((path, str(e)))
            continue
        for bad, why in damaged:
            aside = _set_aside(bad)
            say(f"warning: checkpoint {bad.name} is damaged ({why}); moved to {aside.name}, "
                f"resuming from {path.name}, the newest verified checkpoint")
        return path
    if damaged:
        raise TrainError(f"no verified checkpoint in {checkpoints_root(out_dir)}: "
                         + "; ".join(why for _, why in damaged)
                         + " (start a new run, or restore the files)")
    return None


def _set_aside(path: Path) -> Path:
    aside = path.with_name(DAMAGED_PREFIX + path.name)
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{DAMAGED_PREFIX}{path.name}.{n}"), n + 1
    os.replace(path, aside)
    return aside


def last_good(out_dir: Path) -> Path | None:
    """The newest checkpoint whose training state was finite (meta.json says so) and whose files are
    all there; older checkpoints without the flag count as finite."""
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            meta = validate(path, checksums=False)
        except DamagedCheckpoint:
            continue
        if meta.get("finite", True):
            return path
    return None


def check_writable(out_dir: Path) -> None:
    """Fail now, not after training steps, when checkpoints cannot be written at all (a read-only
    directory, `checkpoints` being a file): DiskError naming the path."""
    root = checkpoints_root(out_dir)
    probe = root / f".probe-{os.getpid()}"
    created = not root.exists() and not root.is_symlink()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.mkdir()
        (probe / "x").write_bytes(b"x")
    except OSError as e:
        if e.errno == errno.EEXIST and not root.is_dir():
            raise DiskError(f"{root}: exists and is not a directory; checkpoints cannot be saved") from None
        raise DiskError(f"checkpoints cannot be saved in {root}: {describe_os_error(e)}") from None
    finally:
        shutil.rmtree(probe, ignore_errors=True)
        if created:  # leave the directory as it was: the first save creates it
            shutil.rmtree(root, ignore_errors=True)


class _HashingWriter:
    """A binary file that hashes what goes through it and keeps the first OSError (torch.save turns
    write errors into a RuntimeError that no longer says what happened)."""

    def __init__(self, fh):
        self.fh, self.h, self.error = fh, hashlib.sha256(), None

    def write(self, b) -> int:
        try:
            n = self.fh.write(b)
        except OSError as e:
            self.error = self.error or e
            raise
        self.h.update(b)
        return n

    def flush(self) -> None:
        self.fh.flush()


def _failure(e: BaseException, writer: _HashingWriter | None) -> str:
    if writer is not None and writer.error is not None:
        return describe_os_error(writer.error)
    if isinstance(e, OSError):
        return describe_os_error(e)
    m = re.search(r"os error (\d+)", str(e))  # safetensors: "I/O error: ... (os error 28)"
    return os.strerror(int(m.group(1))) if m else str(e)


def save(out_dir: Path, step: int, tokens: int, *, cfg, model_state: dict[str, torch.Tensor], train_state: dict,
         keep: int) -> Path:
    """Write one checkpoint atomically (call on rank 0 only) and prune to the newest `keep` (plus the
    last good one). A write that fails is a DiskError naming the cause and the last saved checkpoint."""
    root = checkpoints_root(out_dir)
    final = root / step_dir_name(step)
    writer = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*"):  # left by a killed run; never a finished checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(final) as tmp:
            with torch.device("meta"):
                shell = Mellum2(cfg)
            shell.load_state_dict(model_state, assign=True, strict=True)
            shell.save_pretrained(tmp / "model", dtype=torch.float32)
            with open(tmp / "train_state.pt", "wb") as fh:
                writer = _HashingWriter(fh)
                torch.save(train_state, writer)
            # the weights are read back (from the page cache) by the hash; the train state was hashed as written
            sums = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted((tmp / "model").rglob("*")) if f.is_file()}
            sums["train_state.pt"] = writer.h.hexdigest()
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            finite = bool(all(torch.isfinite(t).all() for t in model_state.values() if t.is_floating_point()))
            finite = finite and not train_state.get("trainer", {}).get("bad_streak", 0)
            meta = {"format": FORMAT, "step": step, "tokens": tokens, "files": files, "sha256": sums,
                    "finite": finite}
            meta["meta_sha256"] = _meta_digest(meta)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    except (OSError, RuntimeError, SafetensorError) as e:
        if isinstance(e, RuntimeError) and not (writer is not None and writer.error is not None) \
                and "inline_container" not in str(e) and "basic_ios" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise  # not a write failure: a programming error keeps its traceback
        last = list_checkpoints(out_dir)
        raise DiskError(f"checkpoint {final} not saved: {_failure(e, writer)}; last saved checkpoint: "
                        f"{last[-1][1] if last else 'none'}") from None
    prune(out_dir, keep)
    return final


def prune(out_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, never the newest finite one (`last_good`)."""
    if keep <= 0:
        return
    found = list_checkpoints(out_dir)
    good = last_good(out_dir)
    for _, old in found[:-keep]:
        if old != good:
            shutil.rmtree(old, ignore_errors=True)


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
