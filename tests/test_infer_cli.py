"""`mellum2 generate` / `mellum2 complete`: the streamed text is the greedy decode, the last line
gives tokens/s (and acceptance); bad input is named."""
import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.cli import main as mellum2_cli
from mellum2.infer import cli
from mellum2.tokenizer.bpe import train_bpe

TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
         "class Foo:\n    pass\n", "import os\nimport sys\n"] * 20


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "model"
    tok = train_bpe(TEXTS, 320)
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small", vocab_size=320)).eval()
    m.save_pretrained(d)
    tok.save(d)
    return d, m, tok


def greedy(m, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("spec", [False, True])
def test_generate_streams_the_greedy_text(ckpt, capsys, spec):
    d, m, tok = ckpt
    argv = ["generate", "--model", str(d), "--prompt", "def add", "--max-new-tokens", "12"]
    assert cli.main(argv + (["--speculative"] if spec else [])) == 0
    out, err = capsys.readouterr()
    prompt = [tok.bos_id] + tok.encode("def add", allow_special=False)
    new = greedy(m, prompt, 12)[len(prompt):]
    stops = {tok.eot_id, tok.eos_id}
    if any(t in stops for t in new):
        new = new[:next(i for i, t in enumerate(new) if t in stops)]
    assert out == tok.decode(new) + "\n"
    assert "tok/s" in err and (("acceptance" in err) == spec)


def test_complete_runs_fim(ckpt, capsys):
    d, _, _ = ckpt
    assert cli.main(["complete", "--model", str(d), "--prefix", "def add(a, b):\n    ", "--suffix", "\n",
                     "--max-new-tokens", "6", "--temperature", "0.7", "--seed", "1"]) == 0
    assert "tok/s" in capsys.readouterr().err


def test_run_directory_is_resolved(ckpt, tmp_path):
    d, _, _ = ckpt
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000010" / "model").symlink_to(d)
    assert cli.resolve_model_dir(str(run)) == run / "checkpoints" / "step_00000010" / "model"


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "no config.json"),
    (["generate", "--prompt", "x", "--top-p", "2"], "--top-p"),
    (["complete", "--prefix", "x", "--temperature", "-1"], "--temperature"),
])
def test_errors_are_named(ckpt, capsys, argv, msg):
    d, _, _ = ckpt
    if "--model" not in argv:
        argv = argv[:1] + ["--model", str(d)] + argv[1:]
    assert mellum2_cli(argv) == 1  # the dispatcher prints the error as one line
    err = capsys.readouterr().err
    assert msg in err and err.startswith(f"mellum2 {argv[0]}: error: ") and err.count("\n") == 1


def test_missing_tokenizer(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    Mellum2(ModelConfig.from_preset("test-small")).save_pretrained(tmp_path / "m")
    monkeypatch.setenv("MELLUM2_CACHE", str(tmp_path / "nothing"))  # no default data directory either
    assert mellum2_cli(["generate", "--model", str(tmp_path / "m"), "--prompt", "x"]) == 1
    assert "--tokenizer" in capsys.readouterr().err


def test_unknown_subcommand(capsys):
    assert cli.main(["frobnicate"]) == 2


def test_draft_vocab_file_is_used_and_checked(ckpt, capsys, tmp_path):
    import shutil

    d, _, _ = ckpt
    d2 = tmp_path / "m"
    shutil.copytree(d, d2)
    argv = ["generate", "--model", str(d2), "--prompt", "def add", "--max-new-tokens", "8", "--speculative"]
    assert cli.main(argv) == 0
    plain = capsys.readouterr().out
    (d2 / "draft_vocab.json").write_text('{"ids": [0, 1, 2, 3, 40, 41, 42]}')
    assert cli.load_draft_vocab(d2) == [0, 1, 2, 3, 40, 41, 42]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == plain  # a draft vocabulary never changes the output
    (d2 / "draft_vocab.json").write_text('{"nope": 1}')
    assert mellum2_cli(argv) == 1
    assert "draft_vocab.json" in capsys.readouterr().err
