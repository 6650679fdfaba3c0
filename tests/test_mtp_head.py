"""`mellum2 train-mtp`: only the head trains, a head trained on a frozen trunk drafts about as well as
one trained jointly, and the checkpoint with the head is written atomically and loads back."""
import json

import pytest
import torch

from mellum2 import Mellum2, ModelConfig, load_pretrained
from mellum2.cli import main as mellum2_cli
from mellum2.train import mtp_head
from mellum2.train.mtp_head import freeze_trunk, measure_acceptance, train_head, with_fresh_head


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def markov_batches(n, T, seed, V=67):
    """Endless batches of a learnable toy language (a favourite successor per token, 85%)."""
    nxt = torch.randint(3, V, (V,), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.empty(n, T, dtype=torch.long)
        x[:, 0] = torch.randint(3, V, (n,), generator=g)
        for t in range(1, T):
            noise = torch.rand(n, generator=g) < 0.15
            x[:, t] = torch.where(noise, torch.randint(3, V, (n,), generator=g), nxt[x[:, t - 1]])
        yield {"input_ids": x, "labels": x.clone(), "position_ids": None}


@pytest.fixture(scope="module")
def joint():
    """test-small trained jointly, trunk and head together, as pre-training does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small"))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    data = markov_batches(32, 48, 1)
    for _ in range(60):
        x = next(data)["input_ids"]
        m(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(n)
    return m.eval()


def prompts():
    return next(markov_batches(16, 8, 99))["input_ids"].tolist()


def test_only_the_head_changes(joint):
    import copy

    m = with_fresh_head(copy.deepcopy(joint))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train_head(m, markov_batches(8, 32, 2), steps=5, precision="fp32", say=lambda *_: None)
    for k, v in m.state_dict().items():
        if k.startswith("mtp."):
            continue
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, before[k]) for k, v in m.state_dict().items() if k.startswith("mtp."))
    assert all(p.requires_grad for p in m.parameters())  # restored afterwards
    assert [n for n, p in m.named_parameters() if p in set(freeze_trunk(m))] == \
        [n for n, _ in m.named_parameters() if n.startswith("mtp.")]


def test_cached_engine_sees_a_new_head(joint):
    """generate() caches an engine per model; attaching a head later must reach it."""
    import copy

    from mellum2.infer import generate

    m = copy.deepcopy(joint)
    m.mtp = None
    m.cfg = m.cfg.replace(num_nextn_predict_layers=0)
    with pytest.warns(UserWarning, match="no MTP head"):
        assert not generate(m, prompts()[0], 8, speculative=True, ignore_eos=True).stats.speculative
    with_fresh_head(m)
    r = generate(m, prompts()[0], 8, speculative=True, ignore_eos=True)
    assert r.stats.speculative and r.stats.drafted > 0


def test_fresh_head_keeps_the_trunk(joint):
    import copy

    m = copy.deepcopy(joint)
    m.mtp = None
    m.cfg = m.cfg.replace(num_nextn_predict_layers=0)
    m2 = with_fresh_head(copy.deepcopy(m))
    x = torch.randint(3, 67, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(m2(x).logits, m(x).logits)
    assert m2.mtp is not None and m2.cfg.num_nextn_predict_layers == 1


@pytest.mark.parametrize("target", ["trunk", "tokens"])
def test_frozen_trunk_head_drafts_like_a_joint_one(joint, target):
    import copy

    a_joint = measure_acceptance(joint, prompts(), 32)["acceptance"]
    m = with_fresh_head(copy.deepcopy(joint), seed=3)
    a_fresh = measure_acceptance(m, prompts(), 32)["acceptance"]
    train_head(m, markov_batches(16, 48, 7), steps=60, lr=1e-2, target=target, precision="fp32",
               say=lambda *_: None)
    a_head = measure_acceptance(m, prompts(), 32)["acceptance"]
    assert a_fresh < 0.3 < a_joint
    assert a_head > a_joint - 0.1, (a_fresh, a_head, a_joint)


def _ckpt(tmp_path, mtp_layers=0):
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small", num_nextn_predict_layers=mtp_layers))
    d = tmp_path / "ckpt"
    m.save_pretrained(d)
    (d / "notes.txt").write_text("kept")
    return d, m


def test_cli_adds_a_head_and_saves_atomically(tmp_path):
    d, m = _ckpt(tmp_path)
    rc = mtp_head.main(["--model", str(d), "--data", "synthetic", "--steps", "3", "--batch-size", "2",
                        "--seq-len", "32", "--eval-prompts", "0", "--log-every", "1"])
    assert rc == 0
    assert load_pretrained(d).mtp is None  # the source as it was: the default --out is a new directory
    out = d.with_name(d.name + "-mtp")
    back = load_pretrained(out)
    assert back.mtp is not None and back.cfg.num_nextn_predict_layers == 1
    for k, v in m.state_dict().items():  # the trunk as it was
        torch.testing.assert_close(back.state_dict()[k], v)
    assert (out / "notes.txt").read_text() == "kept"
    summary = json.loads((out / "mtp_head.json").read_text())
    assert summary["had_head"] is False and len(summary["log"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]  # no temp dirs left


def test_cli_self_source_to_another_dir(tmp_path):
    d, _ = _ckpt(tmp_path, mtp_layers=1)
    out = tmp_path / "out"
    rc = mtp_head.main(["--model", str(d), "--out", str(out), "--data", "synthetic", "--steps", "2",
                        "--batch-size", "2", "--seq-len", "24", "--prompt-len", "8", "--source", "self",
                        "--target", "tokens", "--eval-prompts", "0", "--precision", "fp32"])
    assert rc == 0 and load_pretrained(out).mtp is not None
    assert json.loads((out / "mtp_head.json").read_text())["had_head"] is True


def test_failed_save_leaves_the_checkpoint(tmp_path, monkeypatch):
    d, _ = _ckpt(tmp_path)
    before = sorted(p.name for p in d.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(Mellum2, "save_pretrained", boom)
    rc = mellum2_cli(["train-mtp", "--model", str(d), "--data", "synthetic", "--steps", "1", "--batch-size", "2",
                      "--seq-len", "16", "--eval-prompts", "0"])
    assert rc == 1
    assert sorted(p.name for p in d.iterdir()) == before
    assert load_pretrained(d).mtp is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]


@pytest.mark.parametrize("args,msg", [
    (["--model", "/nonexistent/dir"], "no config.json"),
    (["--steps", "0"], "--steps"),
    (["--seq-len", "4096"], "max_position_embeddings"),
])
def test_cli_errors_name_the_problem(tmp_path, capsys, args, msg):
    d, _ = _ckpt(tmp_path)
    base = ["--model", str(d), "--data", "synthetic", "--eval-prompts", "0"]
    assert mellum2_cli(["train-mtp"] + base + args) == 1
    err = capsys.readouterr().err
    assert msg in err and err.startswith("mellum2 train-mtp: error: ")
