"""Checkpoint I/O in the Hugging Face layout of the released Mellum 2 weights.

Loads: config.json + `model.safetensors` or shards listed in `model.safetensors.index.json`, with
experts either one tensor per expert (the released layout, and what transformers 5.18's
`save_pretrained` writes) or packed as transformers holds them in memory (`experts.gate_up_proj`
[E, 2I, D], `experts.down_proj` [E, D, I]). `load_weights` fills a model that was built on the meta
device and allocated once in the target dtype (transformer.load_pretrained) one memory-mapped tensor
at a time, so two full copies never coexist. Every key, shape and file is checked; any problem raises
`CheckpointError` naming the file and key.

Saves: the released layout, sharded above `max_shard_bytes`, written through `mellum2.atomic.atomic_dir`
(a temporary sibling directory renamed into place only when complete, so a crash leaves no directory
that looks like a finished checkpoint). MTP weights go under `mtp.*` with `num_nextn_predict_layers`
in config.json.

This module knows the file format, not the model class (`model` is any module with Mellum2's
parameter names and a `cfg`): transformer.py imports it for `save_pretrained` and `load_pretrained`.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mellum2.atomic import atomic_dir
from mellum2.errors import MellumError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(MellumError, ValueError):
    """A checkpoint that cannot be loaded as it stands; the message names the file and key."""


# ---------------------------------------------------------------------------- save
def hf_state(model):
    """(name, tensor) pairs of the released layout; experts split into per-expert views."""
    for name, t in model.state_dict().items():
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            for e in range(t.shape[0]):
                yield f"{m.group(1)}.{e}.{m.group(2)}.weight", t[e]
        else:
            yield name, t


def save_pretrained(model, path, max_shard_bytes: int | None = None, dtype=None) -> None:
    path = Path(path)
    max_shard_bytes = max_shard_bytes or DEFAULT_SHARD_BYTES
    dtype = dtype or next(model.parameters()).dtype
    with atomic_dir(path) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in hf_state(model):
            t = t.detach().to("cpu", dtype).contiguous()
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        n = len(shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for fname, shard in zip(names, shards):
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        if n > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
                     "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        cfg = model.cfg.replace(extra={**model.cfg.extra, "architectures": ["MellumForCausalLM"],
                                       "dtype": str(dtype).removeprefix("torch.")})
        cfg.save(tmp / "config.json")


# ---------------------------------------------------------------------------- load
def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist and to be complete."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if (path / INDEX).exists():
        try:
            wm = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX}: malformed index ({e}); expected a 'weight_map' object") from None
        files = sorted({path / f for f in wm.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {INDEX} is missing")
    elif (path / SINGLE).exists():
        files = [path / SINGLE]
    else:
        raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}")
    for f in files:
        check_safetensors(f)
    return files


def check_safetensors(f: Path) -> None:
    """Header sanity and size: a truncated file fails here, before anything is loaded."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{f}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{f}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{f}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: corrupt safetensors header (not a JSON object)")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        ok = isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list) \
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2 \
            and all(isinstance(x, int) and x >= 0 for x in v["data_offsets"] + v["shape"])
        if not ok:
            raise CheckpointError(f"{f}: corrupt safetensors header (entry {k!r} is not "
                                  "{dtype, shape, data_offsets})")
        end = max(end, v["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(f"{f}: truncated safetensors file (expected {8 + n + end} bytes, found {size})")


def load_weights(model, path, mtp: bool = True) -> None:
    """Fill `model` (allocated, any dtype and device) from the checkpoint directory `path`; every
    parameter must be found exactly once. `mtp=False` skips the checkpoint's `mtp.*` tensors."""
    path = Path(path)
    files = weight_files(path)
    params = dict(model.named_parameters())
    todo = {name: set(range(p.shape[0])) if name.endswith(("experts.gate_proj", "experts.up_proj",
                                                           "experts.down_proj")) else None
            for name, p in params.items()}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    if key.startswith("mtp.") and not mtp:
                        continue
                    _load_one(key, sf, f, params, todo)
        except SafetensorError as e:  # a header that parses but does not describe the file
            raise CheckpointError(f"{f}: corrupt safetensors file ({e})") from None
    missing = [k for k, v in todo.items() if v is None or v]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing weights for {shown}")


def _load_one(key: str, sf, f: Path, params, todo) -> None:
    def put(name, value, index=None):
        if name not in params:
            raise CheckpointError(f"{f}: unexpected tensor {key!r} (not part of this model's config)")
        target = params[name] if index is None else params[name][index]
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{f}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
        if index is None:
            todo[name] = set() if todo[name] is not None else False
        else:
            todo[name].discard(index)

    m = _EXPERT.match(key)
    if m:
        name = f"{m.group(1)}.{m.group(3)}"
        e = int(m.group(2))
        if name in params and e >= params[name].shape[0]:
            raise CheckpointError(f"{f}: tensor {key!r}: expert {e} >= num_experts {params[name].shape[0]}")
        put(name, sf.get_tensor(key), e)
        return
    m = _PACKED.match(key)
    if m and m.group(2) == "gate_up_proj":
        t = sf.get_tensor(key)
        I2 = t.shape[1] if t.dim() == 3 else -1
        if t.dim() != 3 or I2 % 2:
            raise CheckpointError(f"{f}: tensor {key!r} has shape {tuple(t.shape)}, expected [E, 2I, D]")
        put(f"{m.group(1)}.gate_proj", t[:, : I2 // 2])
        put(f"{m.group(1)}.up_proj", t[:, I2 // 2:])
        return
    if key not in params:
        raise CheckpointError(f"{f}: unexpected tensor {key!r} (not part of this model's config)")
    put(key, sf.get_tensor(key))
