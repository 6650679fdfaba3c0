"""Accounting: analytic counts equal the real model; FLOPs equal torch's FlopCounter; the CLI."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mellum2 import Mellum2, ModelConfig, cli
from mellum2.model import info
from mellum2.model.accounting import _avg_keys, count_params, flops_per_token, kv_cache_bytes, param_table
from mellum2.model.config import PRESETS
from mellum2.model.layers import attn_mask


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_analytic_counts_equal_real_model(preset):
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        m = Mellum2(cfg)
    for part in ("trunk", "mtp", "all"):
        assert m.num_params(part) == count_params(cfg, part)
        assert m.num_active_params(part) == count_params(cfg, part, active=True)


def test_released_12b_counts():
    cfg = ModelConfig.from_preset("mellum2-12b")
    t = param_table(cfg)["trunk"]
    assert count_params(cfg) == 12_149_923_072
    assert t["experts"] == 11_098_128_384 and t["attention"] == 594_549_760
    assert t["embedding"] == t["lm_head"] == 226_492_416
    assert t["router"] == 4_128_768 and t["norms"] == 131_328
    assert count_params(cfg, active=True) == 2_439_060_736  # "about 2.44B active"
    # 5,631 tensors in the released checkpoint (experts one tensor each)
    with torch.device("meta"):
        m = Mellum2(cfg.replace(num_nextn_predict_layers=0))
    from mellum2.model.hf import hf_state
    assert sum(1 for _ in hf_state(m)) == 5631


def test_kv_cache_bytes_12b():
    cfg = ModelConfig.from_preset("mellum2-12b")
    per_layer = 2 * 4 * 128 * 2
    assert kv_cache_bytes(cfg, 131072) == 7 * 131072 * per_layer + 21 * 1024 * per_layer
    assert kv_cache_bytes(cfg, 512) == 28 * 512 * per_layer
    # "about 14 KB per token in bf16 (only 7 layers grow)"
    assert 13.5 < kv_cache_bytes(cfg, 131072) / 131072 / 1024 < 14.5


def test_matmul_flops_equal_flop_counter():
    cfg = ModelConfig.from_preset("test-small")
    m = Mellum2(cfg).eval()
    for mod in m.modules():  # the loop path uses plain matmuls that FlopCounterMode counts
        if hasattr(mod, "impl"):
            mod.impl = "loop"
    T = 40
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    for mtp in (False, True):
        fc = FlopCounterMode(display=False)
        with fc, torch.no_grad():
            m(ids, mtp=mtp)
        counted = sum(v for k, v in fc.get_flop_counts()["Global"].items() if "mm" in str(k))
        f = flops_per_token(cfg, T, mtp=mtp)
        # MTP runs over T-1 positions
        expected = 2 * f["matmul_params"] * T if not mtp else \
            2 * flops_per_token(cfg, T, mtp=False)["matmul_params"] * T + \
            2 * (f["matmul_params"] - flops_per_token(cfg, T, mtp=False)["matmul_params"]) * (T - 1)
        assert counted == expected, (mtp, counted, expected)


@pytest.mark.parametrize("T, W", [(10, None), (10, 3), (7, 7), (100, 16)])
def test_average_keys_equals_mask(T, W):
    assert _avg_keys(T, W) == pytest.approx(attn_mask(T, W, None, "cpu").sum().item() / T)


def test_info_cli(capsys):
    assert info.main(["--preset", "mellum2-12b"]) == 0
    out = capsys.readouterr().out
    assert "12,149,923,072" in out and "2,439,060,736" in out and "128K context" in out
    with pytest.raises(SystemExit):
        info.main(["--preset", "nope"])


def test_info_cli_bad_model_is_a_clear_error(tmp_path, capsys):
    for model, needle in ((tmp_path / "nowhere", "no config.json"), (tmp_path, "hidden_size")):
        if model == tmp_path:
            (tmp_path / "config.json").write_text('{"model_type": "mellum", "hidden_size": -3}')
        assert cli.main(["info", "--model", str(model)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("mellum2 info: error: ") and err.count("\n") == 1
        assert str(model) in err and needle in err
