"""Sharded DCP checkpoints (mellum2/train/dcp.py) on gloo: saved by 2 processes (FSDP2 + expert
parallel) and loaded by 1, saved by 1 and loaded by 2; model and optimiser state must come back
bit for bit, and the export to the Hugging Face layout must load as the same model."""
import pytest
import torch
import torch.multiprocessing as mp

from mellum2 import Mellum2, ModelConfig
from mellum2.model import load_pretrained
from mellum2.train.dcp import export_hf, load_sharded, save_sharded
from mellum2.train.optim import build_optimizers
from mellum2.train.parallel import Dist, full_model_state, full_optim_state, install_count_reducer, parallelize
from mellum2.train.trainer import Trainer

CFG = "test-small"
B, T = 4, 16


class _Slice:
    phase = 0

    def __init__(self, rank, world, vocab):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (B, T), generator=g)[rank * B // world:(rank + 1) * B // world]

    def __iter__(self):
        while True:
            yield {"input_ids": self.ids, "labels": self.ids, "position_ids": torch.arange(T).expand(len(self.ids), T)}


def _setup(rank, world, seed, ep):
    cfg = ModelConfig.from_preset(CFG)
    torch.manual_seed(seed)
    model = Mellum2(cfg)
    d = Dist(rank=rank, world=world, backend="gloo" if world > 1 else None)
    parallelize(model, d, ep=ep, precision="fp32")
    opts = build_optimizers(model, 1e-2)
    tr = Trainer(model, opts, lambda s: 1e-2, _Slice(rank, world, cfg.vocab_size), d, precision="fp32",
                 tap=install_count_reducer(model, d))
    return cfg, model, opts, tr, d


def _full(model, opts, d):
    ms = {k: v.clone() for k, v in full_model_state(model, d).items()}
    return ms, full_optim_state(model, opts.list, d)


def _train_and_save(rank, world, ckpt):
    cfg, model, opts, tr, d = _setup(rank, world, seed=0, ep=world > 1)
    for _ in range(2):
        tr.train_step()
    save_sharded(ckpt, model, opts.list, cfg, extra={"step": tr.step})
    return _full(model, opts, d)


def _load(rank, world, ckpt):
    cfg, model, opts, tr, d = _setup(rank, world, seed=7, ep=world > 1)  # other initial weights
    extra = load_sharded(ckpt, model, opts.list)
    return extra, _full(model, opts, d)


def _worker(rank, world, init, job, ckpt, out):
    import torch.distributed as dist

    from mellum2.train.parallel import shutdown

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    res = (_train_and_save if job == "save" else _load)(rank, world, ckpt)
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    del res
    shutdown()


def _spawn(tmp_path, job, ckpt):
    out = tmp_path / f"{job}.pt"
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/pg_{job}", job, str(ckpt), str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def _assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    sa, sb = oa["state"], ob["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        for s in sa[k]:
            x, y = sa[k][s], sb[k][s]
            x, y = (x.full_tensor() if hasattr(x, "full_tensor") else x), (y.full_tensor() if hasattr(y, "full_tensor") else y)
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), (k, s)


def test_two_ranks_save_one_loads_and_exports(tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    saved = _spawn(tmp_path, "save", ckpt)
    assert (ckpt / ".metadata").exists() and not (tmp_path / ".ckpt.tmp").exists()
    extra, loaded = _load(0, 1, ckpt)
    assert extra == {"step": 2}
    _assert_same(loaded, saved)
    export_hf(ckpt, tmp_path / "hf", dtype=torch.float32)
    m = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    for k, v in m.state_dict().items():
        assert torch.equal(v, saved[0][k]), k


def test_one_rank_saves_two_load(tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    saved = _train_and_save(0, 1, ckpt)
    extra, loaded = _spawn(tmp_path, "load", ckpt)
    assert extra == {"step": 2}
    _assert_same(loaded, saved)


def test_not_a_checkpoint(tmp_path):
    from mellum2.train.errors import TrainError

    with pytest.raises(TrainError, match="no .metadata"):
        load_sharded(tmp_path, None, [])
    with pytest.raises(TrainError, match="needs .metadata and config.json"):
        export_hf(tmp_path, tmp_path / "out")
