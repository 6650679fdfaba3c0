"""MTP acceptance on held-out code (speculative output identical to plain greedy, counts consistent);
the chat / RL suite wrappers call the post-training evaluators or say "not available"; the table
printer; the CLI of completion and infill on a tiny checkpoint."""
import json
import sys
import types

import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.cli import main as mellum2_main
from mellum2.eval import mtp, suites
from mellum2.eval.common import table
from mellum2.tokenizer import train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
         "class Foo:\n    pass\n", "import os\nimport sys\n"] * 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "model"
    tok = train_bpe(TEXTS, 320)
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small", vocab_size=320)).eval()
    m.save_pretrained(d)
    tok.save(d)
    return d, m, tok


@pytest.fixture
def src(tmp_path):
    s = tmp_path / "src"
    s.mkdir()
    for i in range(2):
        (s / f"m{i}.py").write_text("import os\n\n\ndef f(x):\n    y = x + 1\n    return y\n\n\nprint(f(2))\n" * 40)
    return s


def test_mtp_acceptance(ckpt, src):
    _, m, tok = ckpt
    assert m.mtp is not None
    res = mtp.run(m, tok, files=sorted(src.glob("*.py")), prompt_tokens=20, new_tokens=12, quiet=True)
    assert res["available"] and res["identical"]
    assert 0.0 <= res["acceptance"] <= 1.0 and res["drafted"] >= res["accepted"]
    assert res["mean_accepted_length"] == pytest.approx((res["accepted"] + res["verify_rows"]) / res["verify_rows"])
    m2 = Mellum2(ModelConfig.from_preset("test-small", vocab_size=320, num_nextn_predict_layers=0)).eval()
    assert mtp.run(m2, tok, files=sorted(src.glob("*.py")), quiet=True)["available"] is False


def test_suites_call_the_evaluators_or_say_not_available(ckpt, monkeypatch):
    _, m, tok = ckpt
    assert suites._find("mellum2.posttrain.no_such_module", "evaluate") is None
    calls = []
    fake = types.ModuleType("mellum2.posttrain.chateval")
    fake.evaluate = lambda model, tok_, think, n, max_new_tokens: calls.append((think, n)) or {"well_formed": 0.5}
    monkeypatch.setitem(sys.modules, "mellum2.posttrain.chateval", fake)
    assert suites.chat(m, tok, think=True, n=3) == {"available": True, "well_formed": 0.5} and calls == [(True, 3)]
    monkeypatch.setitem(sys.modules, "mellum2.posttrain.chateval", types.ModuleType("mellum2.posttrain.chateval"))
    r = suites.chat(m, tok)
    assert r["available"] is False and "chateval" in r["reason"]


def test_table():
    t = table([{"a": 1, "b": 0.12345}, {"a": 22, "c": "x"}])
    assert t.splitlines()[0] == "| a  | b     | c |" and "0.123" in t and len(t.splitlines()) == 4


def test_cli_completion_and_infill(ckpt, src, tmp_path, capsys):
    d, _, _ = ckpt
    out = tmp_path / "c.json"
    assert mellum2_main(["eval", "completion", "--model", str(d), "--source", str(src), "--files", "2",
                         "--contexts", "32", "--json", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res["rows"]] == ["fim", "ltr"] and res["rows"][0]["tasks"] == 4
    assert "edit_similarity" in capsys.readouterr().out
    assert mellum2_main(["eval", "infill", "--model", str(d), "--modes", "nope"]) == 2
