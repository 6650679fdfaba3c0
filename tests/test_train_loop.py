"""The training loop (mellum2/train/trainer.py, pretrain.py, metrics.py): logged loss terms, global
normalisation under loss masks and gradient accumulation, non-finite steps, outputs, bad input."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.errors import MellumError
from mellum2.train import pretrain
from mellum2.train.errors import TrainError, TrainingDiverged
from mellum2.train.metrics import expert_load
from mellum2.train.parallel import Dist, install_count_reducer
from mellum2.train.trainer import Trainer
from test_train_utils import cli, make_trainer, train_records

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--no-progress", "--samples", "0", "--peak-tflops", "1", "--data", "synthetic"]


def test_loss_terms_are_logged_and_add_up():
    recs = train_records(steps=6)
    cfg = ModelConfig.from_preset("test-small")
    for r in recs:
        for k in ("step", "loss", "lr", "tokens", "ce", "mtp", "lb", "z", "grad_norm", "phase",
                  "load_min", "load_max", "load_entropy"):
            assert k in r, k
        want = r["ce"] + cfg.mtp_loss_weight * r["mtp"] + cfg.router_aux_loss_coef * r["lb"] \
            + cfg.router_z_loss_coef * r["z"]
        assert r["loss"] == pytest.approx(want, rel=1e-12)
        assert len(r["load_min"]) == 4  # 3 sparse trunk layers + the MTP layer
        assert all(0 <= a <= 1 <= b for a, b in zip(r["load_min"], r["load_max"]))
        assert 0 < r["lb"] < 4  # E sum_e f_e P_e lies in (0, E); ~1 near balance
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_first_step_loss_is_the_models_loss():
    tr = make_trainer(steps=2, precision="fp32")
    batch = next(iter(type(tr.loader)(**{k: getattr(tr.loader, k) for k in (
        "batch_size", "seq_len", "total_tokens", "seed", "vocab_size")})))
    with torch.no_grad():
        ref = tr.model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
    tr.train_step()
    r = tr.drain()[0]
    for k in ("ce", "mtp", "lb", "z"):
        assert r[k] == pytest.approx(ref.losses[k].item(), rel=1e-5), k
    assert r["loss"] == pytest.approx(ref.loss.item(), rel=1e-5)


def test_expert_load_stats():
    s = expert_load(torch.tensor([[5.0, 5, 5, 5], [20, 0, 0, 0]]))
    assert s["load_min"] == [1.0, 0.0] and s["load_max"] == [1.0, 4.0]
    assert s["load_entropy"][0] == pytest.approx(1.0) and s["load_entropy"][1] == pytest.approx(0.0)


class _ListLoader:
    def __init__(self, batches):
        self.batches, self.phase = batches, 0

    def __iter__(self):
        return iter(self.batches)


class _GradGrabber:
    """Stands in for Optimizers: records the gradients the trainer would apply."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def set_lr(self, lr):
        pass

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)


def test_masked_loss_is_normalised_over_the_whole_step():
    """K micro-batches with uneven loss masks give the gradient of one batch holding them all."""
    cfg = ModelConfig.from_preset("test-small").replace(router_aux_loss_coef=0.0)  # LB is per micro-batch
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4, 24))
    labels = ids.clone()
    labels[0, :20] = -100  # row 0 keeps few targets, the others many
    labels[2, 5:9] = -100
    pos = torch.arange(24).expand(4, 24)
    whole = [{"input_ids": ids, "labels": labels, "position_ids": pos}]
    halves = [{k: v[:2] for k, v in whole[0].items()}, {k: v[2:] for k, v in whole[0].items()}]
    grads = []
    for batches, K in ((whole, 1), (halves, 2)):
        torch.manual_seed(1)
        model = Mellum2(cfg)
        grab = _GradGrabber(model)
        tr = Trainer(model, grab, lambda s: 1e-3, _ListLoader(batches), Dist(), grad_accum=K,
                     precision="fp32", clip=0.0, tap=install_count_reducer(model, Dist()))
        tr.train_step()
        grads.append(grab.grads)
        rec = tr.drain()[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)
    assert rec["ce"] > 0


def test_non_finite_steps_are_skipped_then_stop():
    tr = make_trainer(steps=10, max_bad_steps=3)

    def poison(mod, inp, out):  # NaN head input in steps 3, 5, 6, 7 (tr.step counts finished steps)
        return out * float("nan") if tr.step + 1 in (3, 5, 6, 7) else out

    tr.model.model.norm.register_forward_hook(poison)  # the trainer's loss reads no logits (head_loss.py)
    tr.train_step()
    tr.train_step()
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    muon_state = {k: v["momentum_buffer"].clone() for k, v in tr.optims.muon.state.items()}
    tr.train_step()  # step 3: skipped
    for n, p in tr.model.named_parameters():
        assert torch.equal(p, before[n]), n
    for k, v in tr.optims.muon.state.items():
        assert torch.equal(v["momentum_buffer"], muon_state[k])
    tr.train_step()  # step 4: fine again
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        for _ in range(3):
            tr.train_step()
    recs = tr.drain()
    assert [r["skipped"] for r in recs] == [False, False, True, False, True, True, True]
    assert math.isnan(recs[2]["grad_norm"]) and tr.skipped_total == 4


def test_cli_outputs(tmp_path):
    out = tmp_path / "run"
    assert pretrain.run(["--preset", "test-small", "--out", str(out), "--max-steps", "6", "--batch-size", "2",
                         "--seq-len", "32", "--log-every", "4", *FAST]) == out
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[-1]["tokens"] == 6 * 2 * 32
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any((out / "tb").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["phases"][0]["loss_start"] == recs[0]["loss"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000006"]
    args = json.loads((out / "args.json").read_text())
    assert args["total_steps"] == 6 and args["trajectory"]["batch_size"] == 2


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = cli("--preset", "test-small", "--out", out, "--max-steps", "30", "--batch-size", "4", "--seq-len", "32",
            "--save-every", "2", "--log-every", "1", "--lr", "1e4", "--max-bad-steps", "3", "--no-tensorboard",
            *FAST, check=False)
    assert r.returncode == 1
    assert "non-finite steps in a row" in r.stderr and "last good checkpoint" in r.stderr
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["skipped"] and recs[-2]["skipped"] and recs[-3]["skipped"]
    last_step = recs[-1]["step"]
    from mellum2.train import checkpoint

    skipped = {r["step"] for r in recs if r["skipped"]}
    assert not [p for s, p in checkpoint.list_checkpoints(out) if s in skipped]  # none during the streak
    good = checkpoint.last_good(out)
    assert f"last good checkpoint: {good or 'none'}" in r.stderr
    if good is not None:
        assert int(good.name.split("_")[1]) < last_step
        model = checkpoint.load_model(good)
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bad, match", [
    (["--seq-len", "4096"], "--seq-len 4096"),
    (["--batch-size", "0"], "--batch-size"),
    (["--data", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--preset", "nope"], "nope"),
    (["--config", "/nonexistent/config.json"], "config.json"),
    (["--max-steps", "0"], "--max-steps: expected >= 1, got 0"),
    (["--tokens", "-5"], "--tokens: expected >= 1, got -5"),
    (["--data", "EMPTY_DIR"], "index.json: missing"),  # a directory that is not a prepared dataset
    (["--out", "A_FILE"], "exists and is not a directory"),
    (["--lr", "-1"], "--lr: expected a positive number, got -1"),
    (["--clip", "-1"], "--clip: expected >= 0, got -1"),
    (["--weight-decay", "nan"], "--weight-decay: expected >= 0, got nan"),
    (["--weight-decay", "inf"], "--weight-decay: expected >= 0, got inf"),
    (["--resume", "--out", "A_FILE"], "exists and is not a directory"),
    (["--phases", "nope"], "--phases 'nope': neither a preset"),
    (["--phases", '{"budget": 1}'], "--phases: expected a JSON list of phases, got dict"),
    (["--phases", '[{"budget": 1, "mixture": {"code": 1}, "fim_rate": 2}]'], r"phases\[0\].fim_rate"),
    (["--mtp-loss-weight", "-1"], "--mtp-loss-weight: expected >= 0, got -1"),
])
def test_bad_arguments_are_clear_errors(tmp_path, bad, match):
    """Each is a MellumError (TrainError, ConfigError, ShardError, NotFoundError ...) naming the problem."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a directory")
    bad = [{"EMPTY_DIR": str(tmp_path / "empty"), "A_FILE": str(tmp_path / "a_file")}.get(b, b) for b in bad]
    args = ["--out", str(tmp_path / "o"), "--no-progress", "--samples", "0"]
    if "--tokens" not in bad:  # the two are mutually exclusive
        args += ["--max-steps", "2"]
    if "--data" not in bad:
        args += ["--data", "synthetic"]
    if "--preset" not in bad:
        args += ["--preset", "test-small"]
    with pytest.raises(MellumError, match=match):
        pretrain.run(args + bad)
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_run_length_is_required(tmp_path):
    with pytest.raises(TrainError, match="--max-steps"):
        pretrain.run(["--preset", "test-small", "--out", str(tmp_path), "--data", "synthetic"])
    # as torchrun starts it (`python -m`, not through the dispatcher): still one line, exit 1
    r = subprocess.run([sys.executable, "-m", "mellum2.train.pretrain", "--preset", "test-small", "--out",
                        str(tmp_path), "--data", "synthetic"], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1 and r.stderr == ("mellum2 train: error: give the length of the run: "
                                              "--max-steps N or --tokens N\n"), r.stderr


@pytest.mark.parametrize("mode, kw, expect, why", [
    ("on", {}, True, "--compile on"),
    ("off", {}, False, "--compile off"),
    ("auto", {}, True, "compile on (auto"),
    ("auto", {"steps": pretrain.COMPILE_AUTO_MIN_STEPS - 1}, False, "too short"),
    ("auto", {"precision": "fp32"}, False, "fp32"),
    ("auto", {"device_type": "cuda"}, False, "GPUs"),
    ("auto", {"fp8": True}, False, "--fp8"),
    ("auto", {"stage": "long-context"}, False, "long-context"),
    ("auto", {"compiler": None}, False, "C++ compiler"),
])
def test_compile_auto_decision(mode, kw, expect, why):
    args = dict(device_type="cpu", precision="bf16", fp8=False, stage="pretrain",
                steps=pretrain.COMPILE_AUTO_MIN_STEPS, compiler="/usr/bin/g++") | kw
    on, text = pretrain.decide_compile(mode, **args)
    assert on is expect and why in text


def test_compile_flag_parsing_and_the_reported_choice(tmp_path, capsys):
    p = pretrain.build_parser()
    assert p.parse_args([]).compile == "auto"
    assert p.parse_args(["--compile"]).compile == "on"  # the old boolean flag keeps its meaning
    assert p.parse_args(["--compile", "off"]).compile == "off"
    with pytest.raises(SystemExit):
        p.parse_args(["--compile", "sometimes"])
    out = tmp_path / "run"
    pretrain.run(["--preset", "test-small", "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                  "--seq-len", "32", *FAST])
    assert f"compile off (auto: 2 steps < {pretrain.COMPILE_AUTO_MIN_STEPS}" in capsys.readouterr().out
    assert "compile" not in json.loads((out / "args.json").read_text())["parallel"]


def test_phases_and_mtp_weight_flags(tmp_path):
    """--phases sets the curriculum (its budgets move the LR decay), --mtp-loss-weight the model config's
    MTP weight; both are part of the trajectory that resume checks."""
    out = tmp_path / "run"
    phases = ('[{"budget": 0.5, "mixture": {"web": 1}}, {"budget": 0.1, "mixture": {"web": 1}}, '
              '{"budget": 0.4, "mixture": {"web": 1}}]')
    pretrain.run(["--preset", "test-small", "--out", str(out), "--max-steps", "10", "--batch-size", "2",
                  "--seq-len", "32", "--phases", phases, "--mtp-loss-weight", "0.3", "--no-tensorboard", *FAST])
    args = json.loads((out / "args.json").read_text())
    assert args["phase_boundaries_steps"] == [5, 6, 10]  # the report's 58/26/16 would give [6, 9, 10]
    assert args["trajectory"]["phases"] == phases and args["trajectory"]["config"]["mtp_loss_weight"] == 0.3
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # hold until the third phase starts (step index 6, at the peak), then the decay to 0 (the report's
    # budgets would start it at step index 9)
    assert lrs[:7] == [3e-3] * 7 and lrs[7:] == pytest.approx([3e-3 * (10 - s) / 4 for s in (7, 8, 9)])
    with pytest.raises(TrainError, match="mtp_loss_weight"):
        pretrain.run(["--preset", "test-small", "--out", str(out), "--max-steps", "12", "--batch-size", "2",
                      "--seq-len", "32", "--phases", phases, "--resume", "--no-tensorboard", *FAST])
