"""Pathological input gets bounded work and one clear line: train-mtp never rewrites a training
checkpoint, tokenizer training on one huge run of a letter, config.json fields of the wrong type or of
impossible size, and nonsense arguments to generate and eval."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mellum2 import Mellum2, ModelConfig, load_pretrained
from mellum2.cli import main as mellum2_cli
from mellum2.model.accounting import count_params
from mellum2.model.config import ConfigError
from mellum2.tokenizer.bpe import train_bpe
from mellum2.train import checkpoint, mtp_head, pretrain
from test_train_utils import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--preset", "test-small", "--data", "synthetic", "--batch-size", "2", "--seq-len", "32", "--no-progress",
       "--samples", "0", "--peak-tflops", "1", "--no-tensorboard"]
TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20


def _one_line_error(capsys, stage):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mellum2 {stage}: error: "), err
    return err[0]


# ---------------------------------------------------------------- train-mtp
def test_train_mtp_never_rewrites_a_training_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    pretrain.run(RUN + ["--out", str(run), "--max-steps", "2"])
    newest = checkpoint.latest(run)
    args = ["--data", "synthetic", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-prompts", "0",
            "--draft-vocab", "0"]
    assert mtp_head.main(["--model", str(run), *args]) == 0  # no --out: the command generate's notice suggests
    checkpoint.validate(newest)  # every file's checksum as saved
    assert load_pretrained(tmp_path / "run-mtp").mtp is not None
    assert mellum2_cli(["train-mtp", "--model", str(run), "--out", str(newest / "model"), *args]) == 1
    assert "inside a training run's checkpoint" in _one_line_error(capsys, "train-mtp")
    checkpoint.validate(newest)


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_training_is_bounded_on_a_run_of_one_letter(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a" * 3_000_000)  # over data prepare's 1M-character limit: skipped
    (src / "b.txt").write_text("b" * 300_000)  # one 300k-letter line: trained on in pieces
    (src / "c.py").write_text("".join(TEXTS) * 20)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "mellum2.cli", "tokenizer", "train", "--input", str(src),
                        "--vocab-size", "400", "--out", str(tmp_path / "tok"), "--no-progress"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=90)  # hours before
    assert r.returncode == 0, r.stderr
    assert "skipped 1 document(s) over 1,000,000 characters (too_long" in r.stdout


# ---------------------------------------------------------------- config.json
@pytest.mark.parametrize("field,value,expected", [
    ("moe_intermediate_size", 128.5, "expected an integer"),
    ("rms_norm_eps", "x", "expected a finite number"),
    ("num_experts", "16", "expected an integer"),
    ("vocab_size", 1e12, "expected an integer"),
    ("attention_dropout", 2.0, "expected a number >= 0 and <= 1"),
    ("use_cache", "yes", "expected true or false"),
    ("layer_types", 7, "expected a list of strings"),
])
def test_config_fields_are_checked_by_name(tmp_path, field, value, expected):
    d = ModelConfig.from_preset("tiny").to_hf_dict()
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=rf"config.json: ModelConfig.{field}: {expected}"):
        ModelConfig.from_hf(tmp_path)


def test_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, capsys):
    cfg = ModelConfig.from_preset("tiny", vocab_size=10**12)
    cfg.save(tmp_path / "config.json")
    assert mellum2_cli(["train", "--config", str(tmp_path / "config.json"), *RUN[2:], "--max-steps", "1",
                        "--out", str(tmp_path / "run")]) == 1
    line = _one_line_error(capsys, "train")
    assert "training state (weights, gradients, optimiser) need ~" in line and "largest part is embedding" in line
    assert "vocab_size 1000000000000" in line
    # a checkpoint whose config.json says the same: refused before the weights are allocated
    m = Mellum2(ModelConfig.from_preset("test-small"))
    m.save_pretrained(tmp_path / "ck")
    d = json.loads((tmp_path / "ck" / "config.json").read_text())
    d["vocab_size"] = 10**12
    (tmp_path / "ck" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="the weights need ~.* GiB .* available on cpu"):
        load_pretrained(tmp_path / "ck")


def test_vocab_2e7_on_tiny_is_refused_for_training_where_it_cannot_fit(tmp_path, capsys):
    from mellum2.model.accounting import available_memory
    cfg = ModelConfig.from_preset("tiny", vocab_size=20_000_000)
    if count_params(cfg, "all") * 16 < available_memory("cpu"):
        pytest.skip("this machine could hold it")
    cfg.save(tmp_path / "config.json")
    assert mellum2_cli(["train", "--config", str(tmp_path / "config.json"), *RUN[2:], "--max-steps", "1",
                        "--out", str(tmp_path / "run")]) == 1
    assert "vocab_size 20000000" in _one_line_error(capsys, "train")


# ---------------------------------------------------------------- generate and eval arguments
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "model"
    tok = train_bpe(TEXTS, 320)
    torch.manual_seed(0)
    Mellum2(ModelConfig.from_preset("test-small", vocab_size=320)).eval().save_pretrained(d)
    tok.save(d)
    return d


def test_generate_caps_top_k_and_draft_tokens(ckpt, capsys):
    assert mellum2_cli(["generate", "--model", str(ckpt), "--prompt", "def", "--max-new-tokens", "4",
                        "--top-k", "1e9", "--temperature", "1", "--seed", "1"]) == 0
    assert "--top-k 1000000000 capped to the vocabulary size 320" in capsys.readouterr().err
    assert mellum2_cli(["generate", "--model", str(ckpt), "--prompt", "def", "--max-new-tokens", "8",
                        "--speculative", "--draft-tokens", "1000"]) == 0
    err = capsys.readouterr().err
    assert "--draft-tokens 1000 capped to 8" in err and "speculative k=8" in err


@pytest.mark.parametrize("argv,msg", [
    (["--threads", "-1"], "--threads: expected >= 1, got -1"),
    (["--prompt", "def \udcff\udcfe"], "--prompt: not valid UTF-8 (byte 0xff at character 4)"),
])
def test_generate_refuses_bad_arguments(ckpt, capsys, argv, msg):
    base = ["generate", "--model", str(ckpt), "--max-new-tokens", "2"]
    base += [] if "--prompt" in argv else ["--prompt", "def"]
    assert mellum2_cli(base + argv) == 1
    assert msg in _one_line_error(capsys, "generate")


def test_non_utf8_prompt_bytes_from_a_shell(ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable.encode(), b"-m", b"mellum2.cli", b"generate", b"--model", bytes(ckpt),
                        b"--prompt", b"x\xff"], env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == 1 and r.stderr.decode().strip().splitlines() == [
        "mellum2 generate: error: --prompt: not valid UTF-8 (byte 0xff at character 1)"]


@pytest.mark.parametrize("argv,msg", [
    (["--samples", "0"], "--samples: expected >= 1, got 0"),
    (["--json", "."], "--json .: is a directory"),
    (["--json", "NOWHERE/dir/out.json"], "does not exist"),
])
def test_eval_refuses_bad_arguments_before_running(ckpt, capsys, tmp_path, argv, msg):
    argv = [a.replace("NOWHERE", str(tmp_path / "nowhere")) for a in argv]
    assert mellum2_cli(["eval", "passkey", "--model", str(ckpt), "--lengths", "64", *argv]) == 2
    assert not (tmp_path / "nowhere").exists()
    assert msg in _one_line_error(capsys, "eval")
