"""Process group set-up and `parallelize()`: everything that turns the single-device model into the
trained one, applied from outside in one fixed order (torchtitan's): FP8 -> expert parallel ->
activation checkpointing -> fast paths -> torch.compile -> FSDP2.

torch.distributed's submodules (FSDP, composable checkpointing, functional collectives, the state-dict
API, DeviceMesh) are imported where they are used: a torch build may lack torch.distributed.

- FP8 (train/fp8.py) first, so the later wrappers see the converted modules.
- Expert parallelism (`ep=True`, train/expert_parallel.py): every expert stack sharded over all
  ranks as a DTensor (whole experts per rank), tokens dispatched by all-to-all; FSDP2 then skips
  those stacks (`ignored_params`) and shards the rest.
- The fast paths of mellum2/kernels (`kernels.install`: the bf16 CPU training attention, one q/k/v
  matmul, on a CPU the experts' grouped matmul parallel over experts where its C++ extension builds).
- Activation checkpointing per decoder layer (trunk and MTP), via torch's composable `checkpoint`,
  which installs hooks instead of a wrapper, so parameter names (= checkpoint keys) do not change.
- torch.compile per decoder layer (`module.compile()`, again name-preserving) and of the shifted
  cross-entropy (`model.ce`: slice, fp32 cast and log-softmax over [tokens, vocab] in one fused pass
  instead of three full copies). Not the whole model: the router statistics and the count
  all-reduce stay eager. torch's grouped_mm has
  no fp32 kernel under compile, so in fp32 each `experts.gmm` is wrapped in
  `torch.compiler.disable` (a graph break around the expert matmuls; bf16 compiles them whole).
- FSDP2 `fully_shard` per decoder layer, then the root (embedding, head, norms, MTP fc). Parameters
  stay fp32 and matmuls run under autocast, so gradients are reduced in fp32 (as Mellum 2 reduces
  them). Every parameter is sharded along dim 0, which puts whole experts on each rank (see muon.py).
  gloo on CPU, NCCL on CUDA.

The load-balancing loss counts routed slots over the global batch: `install_count_reducer` gives
the model a `count_reducer` that all-reduces the per-layer counts (functional collective, so it also
traces under compile) and taps them for the expert-load statistics the trainer logs.

Checkpoint state under FSDP goes through torch.distributed.checkpoint's full (unsharded) state dicts,
keyed by parameter name, so a run can resume with a different number of processes as far as the
model and optimiser are concerned (the loader decides for itself).
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mellum2 import kernels
from mellum2.model.moe import Experts
from mellum2.model.objective import shifted_ce

from .expert_parallel import apply_expert_parallel, expert_params
from .fp8 import convert_to_fp8


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> Dist:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process needs none of it."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        dev = torch.device("cuda:0" if want == "cuda" else want)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return Dist(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if want == "cuda" else "gloo"
    dev = torch.device(f"cuda:{local}") if want == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world=world, local_rank=local, device=dev, backend=backend)


def decoder_layers(model) -> list[nn.Module]:
    layers = list(model.model.layers)
    if getattr(model, "mtp", None) is not None:
        layers += list(model.mtp.layers)
    return layers


def parallelize(model, d: Dist, *, fp8: bool = False, fp8_backend: str = "auto", ep: bool = False,
                ac: bool = False, compile: bool = False, precision: str = "bf16") -> dict:
    """Apply FP8, expert parallelism (`ep`, over all d.world ranks), activation checkpointing, the fast
    paths (mellum2.kernels.install), compile and (when d.world > 1) FSDP2, in that order.
    Build optimisers only after this (FSDP replaces the parameters). Returns what was applied."""
    applied: dict = {}
    if fp8:
        applied["fp8"] = convert_to_fp8(model, fp8_backend)
    if ep and d.enabled:
        applied["ep"] = {"layers": apply_expert_parallel(model), "degree": d.world}
    if ac:
        from torch.distributed._composable import checkpoint  # torch.distributed: see the module docstring

        for layer in decoder_layers(model):
            checkpoint(layer)
        applied["ac"] = len(decoder_layers(model))
    applied.update(kernels.install(model))
    if compile:
        if precision != "bf16":
            for m in model.modules():
                if isinstance(m, Experts):
                    m.gmm = torch.compiler.disable(m.gmm)
        for layer in decoder_layers(model):
            layer.compile()
        # the loss: slicing, the fp32 cast and log-softmax over [tokens, vocab] fuse into one pass
        # (the trainer's chunked head + CE, head_loss.linear_ce, compiles its part itself)
        model.ce = torch.compile(shifted_ce, dynamic=False)
        applied["compile"] = len(decoder_layers(model))
    if d.enabled:
        from torch.distributed.fsdp import fully_shard  # torch.distributed: see the module docstring

        for m in model.modules():  # unsharded weights are transient under FSDP: nothing to keep
            if isinstance(m, Experts):
                m.cache_gate_up = False
        skip = expert_params(model)  # expert-parallel stacks are sharded already
        for layer in decoder_layers(model):
            fully_shard(layer, ignored_params=skip or None)
        fully_shard(model, ignored_params=skip or None)
        applied["fsdp"] = d.world
    return applied


class CountTap:
    """`model.count_reducer`: sums routed-slot counts [L, E] over ranks and keeps a running total
    (detached) for the expert-load statistics. `take()` returns and clears the total."""

    def __init__(self, d: Dist):
        self.d = d
        self.total_LE: torch.Tensor | None = None

    def __call__(self, counts_LE: torch.Tensor) -> torch.Tensor:
        if self.d.enabled:
            from torch.distributed._functional_collectives import all_reduce, wait_tensor  # see the docstring

            counts_LE = wait_tensor(all_reduce(counts_LE, "sum", dist.group.WORLD))
        c = counts_LE.detach()
        self.total_LE = c.clone() if self.total_LE is None else self.total_LE + c
        return counts_LE

    def take(self) -> torch.Tensor | None:
        t, self.total_LE = self.total_LE, None
        return t


def install_count_reducer(model, d: Dist) -> CountTap:
    tap = CountTap(d)
    model.count_reducer = tap
    return tap


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, d: Dist):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


# ---------------------------------------------------------------------------- state dicts
def _options(d: Dist, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions  # torch.distributed (docstring)

    # one process: the state is already whole (and full_state_dict would ask for a process group)
    return StateDictOptions(full_state_dict=d.enabled, cpu_offload=d.enabled, **kw)


def full_model_state(model, d: Dist) -> dict[str, torch.Tensor]:
    """Unsharded model state dict (whole on rank 0 under FSDP; other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict  # torch.distributed (docstring)

    return get_model_state_dict(model, options=_options(d))


def full_optim_state(model, optims, d: Dist) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict  # torch.distributed (docstring)

    return get_optimizer_state_dict(model, optims, options=_options(d))


def load_optim_state(model, optims, state: dict, d: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict  # torch.distributed (docstring)

    set_optimizer_state_dict(model, optims, state, options=_options(d))


def shutdown() -> None:
    """Destroy the process groups and end their threads now, while the interpreter is whole.

    `destroy_process_group` alone leaves a gloo group alive after FSDP2: every DeviceMesh keeps its
    groups in `_pg_registry`, and DTensor's sharding-propagation cache keeps the meshes. The group's
    three threads (gloo_tcp_loop, 2 x pt_gloo_runloop) then run on into interpreter teardown, where
    they are destroyed in no set order. A rank of a 2-process gloo run aborted, rarely, with
    "terminate called without an active exception" (a C++ thread torn down; 3 times in some hundreds
    of runs, one of them in CI); these threads were the one teardown hazard found. So: the finished
    model's reference cycles are collected, the groups destroyed, every mesh's registry emptied and
    the rest collected, leaving no gloo thread (tests/test_parallel.py checks). Callers drop their
    own references to FSDP modules first.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed.device_mesh import DeviceMesh  # here: only where torch.distributed is built in

    gc.collect()
    dist.destroy_process_group()
    for o in gc.get_objects():
        if issubclass(type(o), DeviceMesh):
            getattr(o, "_pg_registry", {}).clear()
    gc.collect()
