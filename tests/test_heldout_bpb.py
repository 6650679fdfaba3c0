"""benchmarks/heldout_bpb.py: every file token scored exactly once across strided windows, the
single-window score equal to the model's own cross-entropy, and the peer's size equal to `xz -9e`'s."""
import importlib.util
import lzma
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mellum2 import Mellum2, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

_spec = importlib.util.spec_from_file_location(
    "heldout_bpb", Path(__file__).resolve().parents[1] / "benchmarks" / "heldout_bpb.py")
hb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hb)


def test_one_window_is_the_models_cross_entropy():
    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    ids = torch.randint(0, 256, (40,)).tolist()
    with torch.no_grad():
        ce = F.cross_entropy(m(torch.tensor([ids])).logits[0, :-1].float(), torch.tensor(ids[1:]), reduction="sum")
    assert hb.file_bits(m, ids, window=64, stride=32) == pytest.approx(ce.item() / math.log(2), rel=1e-5)


class Uniform(torch.nn.Module):
    """Equal logits everywhere: each scored token costs exactly log2(V) bits."""
    V = 16

    def trunk(self, x):
        return torch.zeros(x.shape[0], x.shape[1], 1), None

    def head(self, h):
        return torch.zeros(h.shape[0], h.shape[1], self.V)


@pytest.mark.parametrize("n, window, stride", [(2, 8, 4), (8, 8, 4), (9, 8, 4), (37, 8, 4), (37, 8, 8),
                                               (37, 8, 1), (100, 16, 5)])
def test_strided_windows_score_every_token_once(n, window, stride):
    bits = hb.file_bits(Uniform(), [i % Uniform.V for i in range(n)], window, stride)
    assert bits == pytest.approx((n - 1) * math.log2(Uniform.V))


def test_strided_windows_give_later_tokens_context():
    """With stride < window a later window's tokens see the previous tokens: a model whose loss
    falls with the position in its window scores lower than with non-overlapping windows."""
    class Positional(Uniform):
        def head(self, h):
            T = h.shape[1]
            logits = torch.zeros(1, T, self.V)
            logits[0, :, 0] = torch.arange(T, dtype=torch.float)  # token 0 ever more likely
            return logits
    ids = [0] * 50
    assert hb.file_bits(Positional(), ids, 16, 4) < hb.file_bits(Positional(), ids, 16, 16)


@pytest.mark.skipif(shutil.which("xz") is None, reason="no xz binary to compare with")
def test_peer_is_xz_9e():
    data = Path(lzma.__file__).read_bytes()
    out = subprocess.run(["xz", "-9e", "-c"], input=data, capture_output=True, check=True).stdout
    assert hb.xz_bits(data) == 8 * len(out)


def test_heldout_files_are_reproducible_and_one_per_package(tmp_path):
    for pkg in ("a", "b", "c"):
        (tmp_path / pkg / "sub").mkdir(parents=True)
        for i in range(3):
            (tmp_path / pkg / "sub" / f"m{i}.py").write_text("x = 1\n" * 600)
        (tmp_path / pkg / "small.py").write_text("x = 1\n")
    files = hb.heldout_files(tmp_path, 10)
    assert len(files) == 3 and len({f.relative_to(tmp_path).parts[0] for f in files}) == 3
    assert files == hb.heldout_files(tmp_path, 10) and hb.heldout_files(tmp_path, 2) == files[:2]
    assert all(f.stat().st_size >= 2048 for f in files)
