"""Bits per byte: the model's bits are the summed next-token NLL (sliding windows score each token
once), the compressors are xz -9e / zstd -19 on each file alone, the CLI prints and writes them."""
import json
import lzma
import math
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from mellum2 import Mellum2, ModelConfig
from mellum2.cli import main as mellum2_main
from mellum2.eval import bpb
from mellum2.eval.common import heldout_files, purelib
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


def reference_bits(m, ids, W):
    """Token j (j >= 1) scored once, by a forward over ids[max(0, start):j+1] where start is the
    window that first reaches it (the same windows, computed one token at a time)."""
    bits, stride = 0.0, W // 2
    for j in range(1, len(ids)):
        begin = 0 if j < W else ((j - W) // stride + 1) * stride
        x = torch.tensor([ids[begin:j + 1]])
        with torch.no_grad():
            logits = m(x).logits[0, -2]
        bits += F.cross_entropy(logits[None].float(), x[0, -1:]).item() / math.log(2)
    return bits


def test_model_bits_match_token_by_token(ckpt):
    _, m, tok = ckpt
    ids = [tok.bos_id] + tok.encode("def add(a, b):\n    return a + b\n" * 3, allow_special=False)
    assert len(ids) > 40
    full = reference_bits(m, ids, 1000)
    assert bpb.model_bits(m, ids, window=1000) == pytest.approx(full, rel=1e-4)
    assert bpb.model_bits(m, ids, window=16) == pytest.approx(reference_bits(m, ids, 16), rel=1e-4)
    assert bpb.model_bits(m, ids, window=16) != pytest.approx(full, rel=1e-4)  # less context, other bits


def test_xz_is_xz_9e():
    data = ("def f(x):\n    return x * 2\n" * 50).encode()
    assert bpb.xz_bits(data) == 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    if shutil.which("xz"):
        out = subprocess.run(["xz", "-9e", "-c"], input=data, capture_output=True, check=True).stdout
        assert bpb.xz_bits(data) == 8 * len(out)
    if bpb.zstd_backend():
        assert 0 < bpb.zstd_bits(data) < 8 * len(data)


def test_heldout_files_are_not_in_the_corpus():
    files = heldout_files(5)
    assert len(files) == 5 and all("site-packages" in f.parts for f in files)
    pkgs = [f.relative_to(purelib()).parts[0] for f in files]
    assert len(set(pkgs)) == 5  # one per package
    assert files == heldout_files(5) and files != heldout_files(5, seed=1)


def test_cli(ckpt, tmp_path, capsys):
    d, _, _ = ckpt
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * (80 + i))
    out = tmp_path / "b.json"
    assert mellum2_main(["eval", "bpb", "--model", str(d), "--source", str(src), "--n", "3", "--json", str(out),
                         "--quiet"]) == 0
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["files"] == 3 and s["bytes"] == sum(r["bytes"] for r in res["rows"])
    assert s["xz_bpb"] == pytest.approx(sum(r["xz_bits"] for r in res["rows"]) / s["bytes"])
    assert s["model_bpb"] > s["xz_bpb"]  # an untrained model is no compressor
    assert "xz -9e" in capsys.readouterr().out
