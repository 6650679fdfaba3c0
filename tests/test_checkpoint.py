"""Training checkpoints (mellum2/train/checkpoint.py): atomic layout, keep-last-k, half-written and
damaged checkpoints, and resume errors that leave everything as it was."""
import json
import os

import pytest
import torch

from mellum2 import Mellum2, ModelConfig, load_pretrained
from mellum2.train import checkpoint, pretrain
from mellum2.train.errors import TrainError

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--preset", "test-small", "--data", "synthetic", "--batch-size", "2", "--seq-len", "32", "--no-progress",
       "--samples", "0", "--peak-tflops", "1", "--no-tensorboard"]


def _save(out, step, keep=3, cfg=None):
    cfg = cfg or ModelConfig.from_preset("test-small")
    torch.manual_seed(step)
    model = Mellum2(cfg)
    state = {"format": checkpoint.FORMAT, "trainer": {"step": step}, "x": torch.arange(3)}
    return checkpoint.save(out, step, step * 10, cfg=cfg, model_state=model.state_dict(), train_state=state,
                           keep=keep), model


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name != ".lock"}  # the lock's record comes and goes with each run


def test_layout_keep_last_k_and_hf_model(tmp_path):
    for s in (2, 4, 6):
        path, model = _save(tmp_path, s, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [4, 6]
    assert checkpoint.latest(tmp_path) == path
    meta = checkpoint.validate(path)
    assert meta["step"] == 6 and meta["tokens"] == 60 and "model/model.safetensors" in meta["files"]
    loaded = load_pretrained(path / "model")  # the HF layout, fp32, with the MTP head
    assert loaded.mtp is not None
    for (n, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert a.dtype == torch.float32 and torch.equal(a, b), n
    assert checkpoint.load_train_state(path)["x"].tolist() == [0, 1, 2]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporaries left


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    path, _ = _save(tmp_path, 3)
    # what a SIGKILL during the next save leaves behind: a hidden temporary with partial content
    tmp = tmp_path / "checkpoints" / ".step_00000006.tmp-abcd"
    (tmp / "model").mkdir(parents=True)
    (tmp / "model" / "model.safetensors").write_bytes(b"\0" * 100)
    assert checkpoint.latest(tmp_path) == path
    _save(tmp_path, 6)
    assert not tmp.exists()  # the next save clears it


@pytest.mark.parametrize("damage", ["truncate", "drop_meta", "drop_state", "bad_meta"])
def test_damaged_newest_checkpoint_is_an_error(tmp_path, damage):
    _save(tmp_path, 3)
    path, _ = _save(tmp_path, 6)
    if damage == "truncate":
        f = path / "model" / "model.safetensors"
        os.truncate(f, f.stat().st_size // 2)
        match = "model.safetensors"
    elif damage == "drop_meta":
        (path / "meta.json").unlink()
        match = "no meta.json"
    elif damage == "drop_state":
        (path / "train_state.pt").unlink()
        match = "train_state.pt: missing"
    else:
        (path / "meta.json").write_text("{not json")
        match = "malformed"
    with pytest.raises(TrainError, match=match):
        checkpoint.latest(tmp_path)  # never silently falls back to step 3


def test_corrupt_train_state_with_right_size_is_an_error(tmp_path):
    path, _ = _save(tmp_path, 3)
    f = path / "train_state.pt"
    f.write_bytes(b"x" * f.stat().st_size)
    with pytest.raises(TrainError, match="train_state.pt: cannot be read"):
        checkpoint.load_train_state(path)


def test_resume_errors_overwrite_nothing(tmp_path):
    out = tmp_path / "run"
    pretrain.run(RUN + ["--out", str(out), "--max-steps", "4", "--save-every", "2"])
    before = _snapshot(out)
    with pytest.raises(TrainError, match="already holds checkpoints"):  # fresh run into a used --out
        pretrain.run(RUN + ["--out", str(out), "--max-steps", "4"])
    with pytest.raises(TrainError, match="lr: checkpoint 0.003, now 0.01"):  # a different trajectory
        pretrain.run(RUN + ["--out", str(out), "--max-steps", "4", "--resume", "--lr", "0.01"])
    with pytest.raises(TrainError, match="batch_size"):
        pretrain.run(RUN + ["--out", str(out), "--max-steps", "4", "--resume", "--batch-size", "3"])
    with pytest.raises(TrainError, match="no finished checkpoint"):
        pretrain.run(RUN + ["--out", str(tmp_path / "empty"), "--max-steps", "4", "--resume"])
    assert _snapshot(out) == before  # every file as it was (and no new ones)


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "run"
    pretrain.run(RUN + ["--out", str(out), "--max-steps", "3"])
    ckpts = _snapshot(out / "checkpoints")
    pretrain.run(RUN + ["--out", str(out), "--max-steps", "3", "--resume"])
    assert _snapshot(out / "checkpoints") == ckpts
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
