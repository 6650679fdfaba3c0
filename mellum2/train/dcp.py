"""Sharded checkpoints through torch.distributed.checkpoint (DCP): every rank writes its own shards,
a run resumes on any number of ranks, and a finished checkpoint exports to the Hugging Face layout.

Why next to checkpoint.py's full checkpoints: those gather the whole model and optimiser onto rank 0
(fine at CPU scale, the memory of one GPU host at 12B: 49 GB of fp32 weights plus 2x that in
optimiser state). A DCP checkpoint is written by all ranks in parallel, each its own slices, and
read back by DCP's planner into whatever layout the loading run has: the state dicts are keyed by
parameter name with global shapes (FSDP2 and expert-parallel parameters are DTensors), so N ranks
save and M ranks load (tests/test_dcp.py: 2 -> 1 and 1 -> 2 on gloo, with FSDP2 and EP).

Layout of a checkpoint directory (written as a hidden sibling, renamed into place by rank 0 when
every rank has finished, so a killed run leaves nothing that looks finished):
  .metadata, __*_*.distcp   DCP's files: {"model": model state, "optim": Muon + AdamW state}
  config.json               the model config (what `export_hf` builds the model from)
  train_state.pt            rank 0's small extra state (step, tokens, ...), when given

`python -m mellum2.train.dcp export CKPT OUT [--dtype bfloat16]` writes the HF layout
(mellum2/model/hf.py) from a DCP checkpoint in one process, without a process group.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mellum2.model import Mellum2, ModelConfig
from mellum2.model.hf import DTYPES

from .errors import TrainError


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _state(model, optims) -> dict:
    """{"model": ..., "optim": ...} as this rank holds them (DTensors where sharded)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict  # torch.distributed (heavy; here only)

    msd, osd = get_state_dict(model, list(optims))
    return {"model": msd, "optim": osd}


def save_sharded(path, model, optims, cfg: ModelConfig, extra: dict | None = None) -> Path:
    """Every rank calls this; rank 0 renames the finished directory into place. Returns the path."""
    import torch.distributed.checkpoint as dcp  # torch.distributed (heavy; here only)

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_state(model, optims), checkpoint_id=str(tmp))
    if _is_main():
        cfg.save(tmp / "config.json")
        if extra is not None:
            torch.save(extra, tmp / "train_state.pt")
        for f in tmp.iterdir():  # durable before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    _barrier()
    return path


def load_sharded(path, model, optims) -> dict | None:
    """Fill `model` and `optims` (already parallelised as the loading run wants) from a DCP checkpoint
    written by any number of ranks. Returns the extra state, if one was saved."""
    import torch.distributed.checkpoint as dcp  # torch.distributed (heavy; here only)
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not (path / ".metadata").exists():
        raise TrainError(f"{path}: not a finished DCP checkpoint (no .metadata)")
    state = _state(model, optims)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, list(optims), model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = path / "train_state.pt"
    return torch.load(extra, map_location="cpu", weights_only=True) if extra.exists() else None


def export_hf(path, out, dtype: torch.dtype = torch.bfloat16) -> None:
    """The model of a DCP checkpoint in the Hugging Face layout (one process, no process group)."""
    import torch.distributed.checkpoint as dcp  # torch.distributed (heavy; here only)

    path = Path(path)
    if not (path / ".metadata").exists() or not (path / "config.json").exists():
        raise TrainError(f"{path}: not a DCP checkpoint of this trainer (needs .metadata and config.json)")
    cfg = ModelConfig.from_hf(path / "config.json")
    with torch.device("meta"):
        model = Mellum2(cfg)
    model.to_empty(device="cpu")  # every parameter is overwritten by the load below
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    model.save_pretrained(out, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mellum2.train.dcp", description="DCP checkpoint tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write the Hugging Face layout of a DCP checkpoint")
    ex.add_argument("ckpt")
    ex.add_argument("out")
    ex.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    a = ap.parse_args(argv)
    export_hf(a.ckpt, a.out, DTYPES[a.dtype])
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
