"""Expert parallelism: each rank holds E / W whole experts of every MoE layer and the routed tokens
travel to them and back with two all-to-alls (torchtitan's expert-parallel dispatch; Mellum 2 was
trained with EP 8, docs/scale.md).

Applied from outside by `parallel.parallelize(ep=True)` before FSDP2, which then shards everything
else and leaves the expert stacks alone (`ignored_params`). The model code stays single-device:
`apply_expert_parallel` turns each expert stack into a DTensor `Shard(0)` on a 1-D mesh over all
ranks (whole experts per rank, so Muon orthogonalises them locally; distributed checkpointing and
the full state dict see the global [E, ., .] tensor under the usual names) and swaps the module's
class for `EPExperts`, whose forward is the dispatch below. The degree is the world size: a mesh
with replicated expert groups (EP smaller than the data-parallel degree) is the next step.

One forward of a layer on rank r, for its T tokens and their S = T * K routed slots:
  1. sort the slots by global expert id; count per expert (counts_E)
  2. all-to-all of the counts: counts_WL[src, l] = slots rank src sends to local expert l
     (one host sync for the split sizes: all_to_all's sizes are host integers, as in torchtitan)
  3. all-to-all of the sorted token rows (autograd-aware: its backward is the reverse all-to-all)
  4. regroup the received rows by local expert (they arrive grouped by source rank), run the
     SwiGLU experts on the local stacks with grouped matmuls, undo the regrouping
  5. all-to-all back, unsort, weight by the router and sum the K slots of each token
Dropless: every slot is served whatever the load, so loss and gradients equal one process's up to
summation order (tests/test_expert_parallel.py, gloo with 2 and 4 processes).

Gradient scale: FSDP averages the other gradients over the W ranks and the trainer's objective is
scaled by W to undo that (model/objective.py StepShare). An expert's gradient instead arrives whole
on its one rank, summed over the tokens of all ranks, so it is divided by W (a hook on the stack).

Legend: T tokens, D model, E experts (global), L local experts (E / W), W ranks, K top-k,
S = T*K slots of this rank, R rows received for the local experts, I expert width.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mellum2.model.layers import compute_dtype
from mellum2.model.moe import Experts, expert_counts

_STACKS = ("gate_proj", "up_proj", "down_proj")


class EPExperts(Experts):
    """Experts whose stacks are DTensors sharded over the expert-parallel mesh (see the module docstring)."""

    ep_group = None  # set by apply_expert_parallel

    def forward(self, x_TD, ids_TK, w_TK):
        if self.impl != "grouped":
            raise ValueError("EPExperts: only the grouped path runs expert-parallel (impl='loop' is the "
                             "single-process reference)")
        return ep_forward(self, x_TD, ids_TK, w_TK)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware all-to-all of rows (a functional collective: its backward is the reverse exchange)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor  # see above

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


def ep_forward(m: EPExperts, x_TD, ids_TK, w_TK):
    group = m.ep_group
    W = dist.get_world_size(group)
    T, K = ids_TK.shape
    D = x_TD.shape[1]
    E = m.num_experts
    L = E // W
    dt = compute_dtype(x_TD)
    # 1. slots sorted by expert (stable: a source's rows for one expert keep slot order)
    ids_S = ids_TK.reshape(-1)
    order_S = ids_S.argsort(stable=True)
    counts_E = expert_counts(ids_S, E)
    # 2. counts exchanged; counts_WL[src, l]: rows rank `src` sends to my local expert l
    counts_WL = torch.empty_like(counts_E)
    dist.all_to_all_single(counts_WL, counts_E, group=group)
    counts_WL = counts_WL.view(W, L)
    sizes = torch.cat([counts_E.view(W, L).sum(1), counts_WL.sum(1), counts_WL.reshape(-1)]).tolist()  # host sync
    send_W, recv_W, recv_WL = sizes[:W], sizes[W:2 * W], sizes[2 * W:]
    # 3. token rows to the experts' ranks
    x_SD = x_TD.to(dt).index_select(0, order_S // K)
    x_RD = _all_to_all(x_SD, recv_W, send_W, group)
    # 4. regroup by local expert: the rows arrive as [src][local expert]; a stable sort by expert
    local_R = torch.repeat_interleave(torch.arange(L, device=x_TD.device).repeat(W),
                                      torch.tensor(recv_WL, device=x_TD.device), output_size=x_RD.shape[0])
    by_expert_R = local_R.argsort(stable=True)
    offs_L = counts_WL.sum(0).cumsum(0).to(torch.int32)
    xg_RD = x_RD.index_select(0, by_expert_R)
    gate, up, down = (getattr(m, n).to_local().to(dt) for n in _STACKS)
    gu_LD2I = torch.cat([gate, up], 1).transpose(1, 2)
    g_RI, u_RI = m.gmm(xg_RD, gu_LD2I, offs=offs_L).chunk(2, dim=-1)
    yg_RD = m.gmm(F.silu(g_RI) * u_RI, down.transpose(1, 2), offs=offs_L)
    y_RD = torch.empty_like(yg_RD).index_copy(0, by_expert_R, yg_RD) if yg_RD.shape[0] else yg_RD
    # 5. back to the source ranks, then to slot order
    y_SD = _all_to_all(y_RD, send_W, recv_W, group)
    y_TKD = torch.empty_like(y_SD).index_copy(0, order_S, y_SD).view(T, K, D)
    return (y_TKD * w_TK.to(dt)[..., None]).sum(1)


def apply_expert_parallel(model, group=None) -> int:
    """Shard every expert stack of `model` over `group` (default: all ranks) and swap in the
    dispatching forward. Returns the number of MoE layers converted. Call before FSDP."""
    from torch.distributed.device_mesh import DeviceMesh  # torch.distributed, present when EP runs
    from torch.distributed.tensor import Shard, distribute_tensor

    group = group or dist.group.WORLD
    W = dist.get_world_size(group)
    todo = [m for m in model.modules() if isinstance(m, Experts) and not isinstance(m, EPExperts)]
    for m in todo:
        if m.num_experts % W:
            raise ValueError(f"expert parallel: {m.num_experts} experts do not split evenly over {W} ranks "
                             f"(pick a process count that divides num_experts)")
    ranks = dist.get_process_group_ranks(group)
    device_type = next(model.parameters()).device.type
    mesh = DeviceMesh.from_group(group, device_type, mesh=torch.tensor(ranks))
    for m in todo:
        for name in _STACKS:
            p = getattr(m, name)
            # every rank holds the same initial stack (seeded build or the same checkpoint): keep its share
            dp = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)], src_data_rank=None),
                                    requires_grad=p.requires_grad)
            dp.register_hook(lambda g, W=W: g / W)  # see "Gradient scale" in the module docstring
            setattr(m, name, dp)
        m.__class__ = EPExperts
        m.ep_group = group
        m.cache_gate_up = False
    return len(todo)


def expert_params(model) -> set:
    """The expert-parallel stacks (FSDP must leave them alone)."""
    return {getattr(m, n) for m in model.modules() if isinstance(m, EPExperts) for n in _STACKS}
