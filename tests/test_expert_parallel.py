"""Expert parallelism (mellum2/train/expert_parallel.py) on CPU with gloo: 2 and 4 processes, experts
sharded over ranks with all-to-all dispatch and FSDP2 on the rest, against one process on the
whole batch. The training step is the real one (Trainer: global token normalisation, the
load-balancing count over ranks, clipping, Muon + AdamW); compared are the logged loss, every
gradient as the optimiser sees it, and every parameter after two steps.

Tolerances (fp32): the runs differ in summation order only (FSDP's reduce-scatter, the experts'
rows arriving in another order, per-rank batch shapes): the first step's gradients by ~2e-7 of each
tensor's norm (bound 1e-5; a missing 1/W on the expert gradients is 1.0, a token at the wrong expert
or a per-rank load count > 1e-2). Muon's bf16 Newton-Schulz turns such differences into ~1e-3 of the
update, so after the first update the bound is 1e-2, which plain FSDP without EP needs as well
(measured 1.2e-3 gradients of step 2, 4e-3 parameters after 2 steps, with and without EP).
"""
import pytest
import torch
import torch.multiprocessing as mp

from mellum2 import Mellum2, ModelConfig
from mellum2.train.optim import build_optimizers
from mellum2.train.parallel import Dist, install_count_reducer, parallelize
from mellum2.train.trainer import Trainer

CFG = "test-small"  # 4 experts top-2 in 3 trunk layers and the MTP layer
B, T, STEPS = 4, 24, 2


class _Slice:
    """The same global batches every run; each rank reads its rows."""

    phase = 0

    def __init__(self, rank, world, vocab):
        g = torch.Generator().manual_seed(1)
        self.batches = [torch.randint(0, vocab, (B, T), generator=g) for _ in range(STEPS)]
        self.rows = slice(rank * B // world, (rank + 1) * B // world)

    def __iter__(self):
        for ids in self.batches:
            ids = ids[self.rows]
            yield {"input_ids": ids, "labels": ids, "position_ids": torch.arange(T).expand(ids.shape[0], T)}


def _run(rank: int, world: int, ep: bool):
    """STEPS training steps; returns (logged records, gradients seen by each optimiser step, params)."""
    cfg = ModelConfig.from_preset(CFG)
    torch.manual_seed(0)
    model = Mellum2(cfg)
    d = Dist(rank=rank, world=world, backend="gloo" if world > 1 else None)
    applied = parallelize(model, d, ep=ep, precision="fp32")
    tap = install_count_reducer(model, d)
    opts = build_optimizers(model, 1e-2)
    tr = Trainer(model, opts, lambda s: 1e-2, _Slice(rank, world, cfg.vocab_size), d, precision="fp32", tap=tap)
    seen = []
    real_step = opts.step

    def step():
        seen.append({n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
        real_step()

    opts.step = step
    for _ in range(STEPS):
        tr.train_step()
    recs = tr.drain()
    params = {n: _full(p.detach()) for n, p in model.named_parameters()}
    return applied, recs, seen, params


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def _worker(rank, world, init, out):
    import torch.distributed as dist

    from mellum2.train.parallel import shutdown

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    res = _run(rank, world, ep=True)
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    del res
    shutdown()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_expert_parallel_matches_one_process(tmp_path, world, one_thread):
    out = tmp_path / "ep.pt"
    mp.spawn(_worker, args=(world, f"file://{tmp_path}/pg", str(out)), nprocs=world, join=True)
    applied, recs, seen, params = torch.load(out, weights_only=False)
    assert applied["ep"] == {"layers": 4, "degree": world} and applied["fsdp"] == world
    _, ref_recs, ref_seen, ref_params = _run(0, 1, ep=False)
    assert len(recs) == len(ref_recs) == STEPS
    for i, (a, b) in enumerate(zip(recs, ref_recs)):  # after the first update: Muon's ~1e-3, as below
        for k in ("loss", "ce", "mtp", "lb", "z", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5 if i == 0 else 1e-2, abs=1e-7), (i, k, a[k], b[k])
    assert len(seen) == len(ref_seen) == STEPS
    for i, (g, ref) in enumerate(zip(seen, ref_seen)):
        assert g.keys() == ref.keys()
        for n in ref:
            assert _rel(g[n], ref[n]) < (1e-5 if i == 0 else 1e-2), (i, n, _rel(g[n], ref[n]))
    for n in ref_params:
        assert _rel(params[n], ref_params[n]) < 1e-2, (n, _rel(params[n], ref_params[n]))


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_experts_must_split_evenly():
    from mellum2.train.expert_parallel import apply_expert_parallel

    with pytest.raises(ValueError, match="do not split evenly"):
        _spawn_one(apply_expert_parallel)


def _spawn_one(fn):
    """No process group of 3 in-process: the world size is faked (the check comes before any collective)."""
    import torch.distributed as dist

    model = Mellum2(ModelConfig.from_preset(CFG))  # 4 experts
    orig = dist.get_world_size
    try:
        dist.get_world_size = lambda group=None: 3
        fn(model, group=object())
    finally:
        dist.get_world_size = orig


@pytest.mark.slow
def test_cli_ep_run_resumes_exactly(tmp_path):
    """`torchrun -m mellum2.train.pretrain --ep` on 2 gloo processes: checkpoints gather the sharded
    expert stacks, and a resumed run repeats the original's losses exactly."""
    import json
    import shutil

    from test_parallel import ARGS, _torchrun

    def recs(out):
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    one, two = tmp_path / "one", tmp_path / "two"
    _torchrun(2, *ARGS, "--out", one, "--max-steps", "4", "--batch-size", "2", "--save-every", "2", "--ep")
    shutil.copytree(one, two)
    shutil.rmtree(two / "checkpoints" / "step_00000004")
    _torchrun(2, *ARGS, "--out", two, "--max-steps", "4", "--batch-size", "2", "--save-every", "2", "--ep", "--resume")
    assert [(r["loss"], r["grad_norm"]) for r in recs(two)] == [(r["loss"], r["grad_norm"]) for r in recs(one)]
