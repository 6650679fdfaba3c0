"""The trainer on the real curriculum loader (mellum2.data.loader.Loader) over a small prepared corpus:
phases, exact resume through the loader's own state, the tokenizer in the run directory, samples."""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from mellum2.data.prepare import prepare
from mellum2.errors import NotFoundError
from mellum2.model import ConfigError
from mellum2.train import pretrain
from mellum2.train.errors import TrainError

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Loader.*renormalised:UserWarning")]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "code").mkdir()
    for m in ("textwrap.py", "string.py", "fnmatch.py", "bisect.py", "heapq.py", "shlex.py", "glob.py", "csv.py"):
        shutil.copy(STDLIB / m, root / "code" / m)
    out = root / "prepared"
    prepare([f"code:{root / 'code'}", "embedded:math"], out, vocab_size=320, scale=0.002, progress=False,
            log=lambda s: None)
    return out


def _run(data_dir, out, *extra):
    return pretrain.run(["--preset", "test-small2", "--data", str(data_dir), "--out", str(out), "--max-steps", "10",
                         "--batch-size", "2", "--seq-len", "64", "--save-every", "5", "--log-every", "2",
                         "--no-progress", "--no-tensorboard", "--peak-tflops", "1", *extra])


def _recs(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_real_loader_run_resumes_exactly(data_dir, tmp_path):
    out = _run(data_dir, tmp_path / "a", "--samples", "4")
    recs = _recs(out)
    assert [r["step"] for r in recs] == list(range(1, 11))
    assert [r["phase"] for r in recs] == [0] * 6 + [1] * 3 + [2]  # 58/26/16% of 10 steps, by tokens
    assert (out / "tokenizer" / "tokenizer.json").is_file()  # inference finds it next to the checkpoints
    assert (out / "tokenizer" / "chat_template.jinja").is_file()  # and chat uses its template
    assert (out / "samples.txt").read_text().count("--- prompt") == 4
    again = tmp_path / "b"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step_00000010")
    _run(data_dir, again, "--samples", "0", "--resume")
    assert [(r["loss"], r["grad_norm"]) for r in _recs(again)] == [(r["loss"], r["grad_norm"]) for r in recs]


def test_tokenizer_larger_than_the_model_vocab_is_an_error(data_dir, tmp_path):
    with pytest.raises(TrainError, match="320 tokens but the model's vocab_size is 256"):
        pretrain.run(["--preset", "test-small", "--data", str(data_dir), "--out", str(tmp_path / "o"),
                      "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress"])


# ---------------------------------------------------------------------------- long-context stage
@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    """test-small2 with plain RoPE on every layer and a 64-token context (an 8K-stage model in miniature)."""
    from mellum2.model import ModelConfig

    root = tmp_path_factory.mktemp("base")
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    cfg = ModelConfig.from_preset("test-small2", max_position_embeddings=64,
                                  rope_parameters={"full_attention": rope, "sliding_attention": rope})
    (root / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return _run(data_dir, root / "run", "--samples", "0", "--config", str(root / "config.json"))


def _stage(data_dir, base, out, *extra):
    return pretrain.run(["--stage", "long-context", "--from", str(base), "--data", str(data_dir), "--out", str(out),
                         "--rope-factor", "4", "--seq-len", "256", "--max-steps", "4",
                         "--batch-size", "1", "--save-every", "2", "--log-every", "1", "--samples", "0",
                         "--no-progress", "--no-tensorboard", "--peak-tflops", "1", *extra])


def test_long_context_stage_writes_the_released_rope_form_and_resumes(data_dir, base_run, tmp_path):
    import torch

    from mellum2.model import ModelConfig, load_pretrained
    from mellum2.model.config import yarn_rope

    out = _stage(data_dir, base_run, tmp_path / "lc")
    cfg = json.loads((out / "checkpoints" / "step_00000004" / "model" / "config.json").read_text())
    base = json.loads((base_run / "checkpoints" / "step_00000010" / "model" / "config.json").read_text())
    released = ModelConfig.from_preset("mellum2-12b").to_hf_dict()["rope_parameters"]
    full, sliding = cfg["rope_parameters"]["full_attention"], cfg["rope_parameters"]["sliding_attention"]
    assert full.keys() == released["full_attention"].keys() and sliding.keys() == released["sliding_attention"].keys()
    theta = base["rope_parameters"]["full_attention"]["rope_theta"]
    assert full == yarn_rope(theta, 4.0, 64) == {"rope_type": "yarn", "rope_theta": theta, "factor": 4.0,
                                                 "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "attention_factor": pytest.approx(0.1 * 1.3862943611198906 + 1)}
    assert sliding == base["rope_parameters"]["sliding_attention"]  # untouched
    assert cfg["max_position_embeddings"] == 256
    assert {k: v for k, v in cfg.items() if k not in ("rope_parameters", "max_position_embeddings")} == \
        {k: v for k, v in base.items() if k not in ("rope_parameters", "max_position_embeddings")}
    recs = _recs(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in recs)
    assert recs[-1]["lr"] < recs[0]["lr"]  # warmup then linear decay to 0 over the stage
    m = load_pretrained(out / "checkpoints" / "step_00000004" / "model")
    assert m.cfg.max_position_embeddings == 256
    with torch.no_grad():  # it runs at 4x the base context
        assert torch.isfinite(m(torch.randint(0, 256, (1, 256))).logits).all()
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step_00000004")
    _stage(data_dir, base_run, again, "--resume")
    assert [(r["loss"], r["grad_norm"]) for r in _recs(again)] == [(r["loss"], r["grad_norm"]) for r in recs]


def test_long_context_stage_starts_from_the_base_weights(base_run):
    import torch

    from mellum2.model import load_pretrained
    from mellum2.train.long_context import extended_config, load_extended, source_dir

    src = source_dir(str(base_run))
    base = load_pretrained(src, dtype=torch.float32)
    for layers, want in (("full", {"full_attention"}), ("all", {"full_attention", "sliding_attention"}), ("none", set())):
        cfg = extended_config(src, 4, layers, None)
        assert {lt for lt, rp in cfg.rope_parameters.items() if rp["rope_type"] == "yarn"} == want
        m = load_extended(src, cfg)
        assert m.cfg is cfg and m.rotary.cfg is cfg and cfg.max_position_embeddings == 256
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), base.state_dict().values()))
        for lt in m.rotary.tables:  # only the YaRN layer types get new rotary tables
            same = torch.equal(m.rotary.tables[lt][0], base.rotary.tables[lt][0])
            assert same == (lt not in want), lt


def test_long_context_stage_bad_arguments(data_dir, base_run, tmp_path):
    with pytest.raises(TrainError, match="needs --from"):
        pretrain.run(["--stage", "long-context", "--data", str(data_dir), "--out", str(tmp_path / "a"), "--max-steps", "1"])
    with pytest.raises(NotFoundError, match="--from .*nowhere.*no config.json"):
        _stage(data_dir, tmp_path / "nowhere", tmp_path / "b")
    with pytest.raises(TrainError, match="--rope-factor: expected >= 1"):
        _stage(data_dir, base_run, tmp_path / "c", "--rope-factor", "0.5")
    with pytest.raises(TrainError, match="--from is for --stage long-context"):
        _run(data_dir, tmp_path / "d", "--from", str(base_run))
    lc = _stage(data_dir, base_run, tmp_path / "e", "--max-steps", "1")
    with pytest.raises(ConfigError, match="already uses YaRN"):  # extending an extended checkpoint again
        _stage(data_dir, lc, tmp_path / "f", "--original-context", "256", "--seq-len", "512")


def test_eval_cli_on_a_long_context_run(data_dir, base_run, tmp_path, capsys):
    from mellum2.cli import main as mellum2_cli
    from mellum2.eval.cli import main as eval_main

    lc = _stage(data_dir, base_run, tmp_path / "lc", "--max-steps", "1")
    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    for m in ("textwrap.py", "string.py", "shlex.py"):
        shutil.copy(STDLIB / m, src / m)
    capsys.readouterr()
    assert eval_main(["passkey", "--model", str(lc), "--lengths", "64,256", "--depths", "0,1", "--samples", "2",
                      "--json", str(tmp_path / "pk.json")]) == 0
    pk = json.loads((tmp_path / "pk.json").read_text())
    assert set(pk["by_length"]) == {"64", "256"} and all(0 <= v <= 1 for v in pk["by_length"].values())
    assert set(pk["grid"]) == {"64@0.0", "64@1.0", "256@0.0", "256@1.0"}
    assert set(pk["token_acc_by_length"]) == set(pk["nll_by_length"]) == {"64", "256"}
    assert "native context 64" in capsys.readouterr().out  # the YaRN original length, not the extended one
    assert eval_main(["ppl-by-position", "--model", str(lc), "--length", "256", "--n", "2", "--first-bucket", "32",
                      "--source", str(tmp_path / "src"), "--json", str(tmp_path / "ppl.json")]) == 0
    rows = json.loads((tmp_path / "ppl.json").read_text())["buckets"]
    assert [(r["from"], r["to"]) for r in rows] == [(0, 32), (32, 64), (64, 128), (128, 256)]
    assert all(1 < r["ppl"] < 1e4 for r in rows)
    assert mellum2_cli(["eval", "passkey", "--model", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no config.json" in capsys.readouterr().err
