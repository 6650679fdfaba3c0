"""A training run directory against a careless or hostile user: two processes on one directory, a
diverging run, flipped bits in checkpoints, a garbled metrics line, a full disk, `checkpoints` being a
file (mellum2/train/runlock.py, checkpoint.py, metrics.py, pretrain.py)."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mellum2.model import load_pretrained
from mellum2.model.hf import CheckpointError
from mellum2.train import checkpoint, pretrain
from mellum2.train.errors import TrainError
from test_train_utils import ROOT, cli

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--preset", "test-small", "--data", "synthetic", "--batch-size", "2", "--seq-len", "32", "--no-progress",
       "--samples", "0", "--peak-tflops", "1", "--no-tensorboard", "--log-every", "1"]


def _files(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path):  # copies: load_file's tensors may share pages with the file, which tests then damage
    return {k: v.clone() for k, v in load_file(path / "model" / "model.safetensors").items()}


# ---------------------------------------------------------------- two processes on one run directory
def test_two_runs_on_one_fresh_directory(tmp_path):
    """Both start at once: one trains to the end, the other is refused with one line and exit 1."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mellum2.train.pretrain", *RUN, "--max-steps", "12", "--save-every", "3",
           "--out", str(out)]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    res = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in res)
    assert codes == [0, 1], res
    err = next(e for rc, e in res if rc == 1).strip().splitlines()
    assert len(err) == 1 and "is in use by another run (pid" in err[0], err
    assert _steps(out) == list(range(1, 13))  # the survivor's records, all of them
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_a_held_lock_refuses_train_resume_and_writes_nothing(tmp_path, capsys):
    from mellum2.train.runlock import RunLock, RunLocked
    out = tmp_path / "run"
    pretrain.run(RUN + ["--out", str(out), "--max-steps", "2"])
    before = _files(out)
    with RunLock(out, say=lambda *a: None):  # another live process, as far as flock is concerned
        for extra in (["--resume"], []):
            with pytest.raises(RunLocked, match="is in use by another run"):
                pretrain.run(RUN + ["--out", str(out), "--max-steps", "4", *extra])
    after = _files(out)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (out / ".lock").write_text(json.dumps({"pid": p.pid, "host": "h", "since": time.time(), "argv": "x"}) + "\n")
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = cli(*RUN, "--max-steps", "1", "--out", out)
    assert f"taking over the lock of {out} left by pid {p.pid}" in r.stdout
    assert (out / ".lock").read_text() == ""  # released on exit


# ---------------------------------------------------------------- a diverging run
def test_no_checkpoint_during_a_non_finite_streak_and_last_good_is_good(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainError) as e:  # --lr 1e3: step 1 applies, then every gradient is NaN
        pretrain.run(RUN + ["--out", str(out), "--max-steps", "30", "--save-every", "1", "--keep", "2",
                            "--max-bad-steps", "3", "--lr", "1e3"])
    recs = {json.loads(x)["step"]: json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()}
    assert any(r["skipped"] for r in recs.values())
    for step, path in checkpoint.list_checkpoints(out):
        assert not recs[step]["skipped"], f"checkpoint {path.name} written during a non-finite streak"
    good = str(e.value).split("last good checkpoint: ")[1]
    step = int(good.rsplit("_", 1)[1])
    assert os.path.isdir(good) and not recs[step]["skipped"]
    assert all(not r["skipped"] for s, r in recs.items() if s <= step)


def test_pruning_keeps_the_newest_finite_checkpoint(tmp_path):
    from test_checkpoint import _save
    _save(tmp_path, 2)
    meta_f = tmp_path / "checkpoints" / "step_00000002" / "meta.json"
    for s in (4, 6):  # two more, whose training state was not finite
        path, _ = _save(tmp_path, s, keep=10)
        meta = json.loads((path / "meta.json").read_text())
        meta["finite"] = False
        meta["meta_sha256"] = checkpoint._meta_digest(meta)
        (path / "meta.json").write_text(json.dumps(meta))
    checkpoint.prune(tmp_path, keep=1)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 6] and meta_f.exists()
    assert checkpoint.last_good(tmp_path).name == "step_00000002"


# ---------------------------------------------------------------- flipped bits
def _flip(f, offset, bit=3):
    b = bytearray(f.read_bytes())
    b[offset] ^= 1 << bit
    f.write_bytes(bytes(b))


@pytest.mark.parametrize("target", ["model/model.safetensors", "train_state.pt"])
def test_a_flipped_bit_is_found_and_resume_falls_back_bit_exact(tmp_path, target):
    out = tmp_path / "run"
    pretrain.run(RUN + ["--out", str(out), "--max-steps", "6", "--save-every", "2", "--keep", "5"])
    newest = out / "checkpoints" / "step_00000006"
    ref, ref_state = _weights(newest), (newest / "train_state.pt").read_bytes()
    f = newest / target
    _flip(f, f.stat().st_size - 100)  # inside the data (a weight, an optimiser moment)
    with pytest.raises(TrainError, match=f"{target}: checksum mismatch"):
        checkpoint.latest(out)
    said = []
    assert checkpoint.newest_verified(out, say=said.append).name == "step_00000004"
    assert len(said) == 1 and str(f) in said[0] and "resuming from step_00000004" in said[0]
    assert (out / "checkpoints" / "damaged-step_00000006").is_dir()
    pretrain.run(RUN + ["--out", str(out), "--max-steps", "6", "--save-every", "2", "--keep", "5", "--resume"])
    again = _weights(newest)
    assert all(torch.equal(ref[k], again[k]) for k in ref)  # redone bit for bit
    assert torch.load(newest / "train_state.pt", weights_only=True)["trainer"] == \
        torch.load(__import__("io").BytesIO(ref_state), weights_only=True)["trainer"]
    assert _steps(out) == list(range(1, 7))


def test_no_verified_checkpoint_names_every_damaged_file(tmp_path):
    out = tmp_path / "run"
    pretrain.run(RUN + ["--out", str(out), "--max-steps", "2", "--save-every", "1"])
    for _, p in checkpoint.list_checkpoints(out):
        _flip(p / "train_state.pt", 200)
    with pytest.raises(TrainError, match="no verified checkpoint.*step_00000002/train_state.pt.*"
                                         "step_00000001/train_state.pt"):
        pretrain.run(RUN + ["--out", str(out), "--max-steps", "4", "--resume"])


def test_damaged_safetensors_header_is_a_clear_error(tmp_path):
    from test_checkpoint import _save
    path, _ = _save(tmp_path, 2)
    f = path / "model" / "model.safetensors"
    raw = f.read_bytes()
    i = raw.index(b"data_offsets")
    f.write_bytes(raw[:i] + b"data_offsetz" + raw[i + 12:])  # still JSON, but not a safetensors header
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_pretrained(path / "model")


# ---------------------------------------------------------------- metrics.jsonl
def test_a_garbled_metrics_line_loses_only_itself(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain.run(RUN + ["--out", str(out), "--max-steps", "6", "--save-every", "3"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20] + "\x00garbage"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 7, \"torn")
    os.rename(out / "checkpoints" / "step_00000006", out / "checkpoints" / "moved")  # resume from step 3
    capsys.readouterr()
    pretrain.run(RUN + ["--out", str(out), "--max-steps", "6", "--save-every", "3", "--resume"])
    assert "dropped 2 torn or garbled line(s) and 3 record(s) after step 3" in capsys.readouterr().out
    assert _steps(out) == [1, 3, 4, 5, 6]


# ---------------------------------------------------------------- disks
def test_checkpoints_being_a_file_fails_before_training(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    r = cli(*RUN, "--max-steps", "3", "--out", out, check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"mellum2 train: error: {out / 'checkpoints'}: exists and is not a "
                                             f"directory; checkpoints cannot be saved"]
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_checkpoints_fails_before_training(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    os.chmod(out / "checkpoints", 0o555)
    r = cli(*RUN, "--max-steps", "3", "--out", out, check=False)
    assert r.returncode == 1 and "permission denied" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))


def test_a_failed_save_names_the_cause_and_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "mellum2.train.pretrain", *RUN, "--max-steps", "3", "--out", str(out)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert r.returncode == 1, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "step_00000003 not saved: File too large" in err[0] and err[0].endswith(
        "last saved checkpoint: none"), err
    assert not list((out / "checkpoints").iterdir())  # no half-written checkpoint left
