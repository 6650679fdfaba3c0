"""ModelConfig: presets, validation, exact round-trip of transformers' config.json."""
import json
import math

import pytest

from mellum2 import ConfigError, ModelConfig
from mellum2.model.config import PRESETS

transformers = pytest.importorskip("transformers")


def _hf_config_json(cfg: ModelConfig, tmp_path) -> dict:
    """config.json exactly as transformers 5.18 writes it for this architecture."""
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures")}
    ours = {k: d.pop(k) for k in ("num_nextn_predict_layers", "mtp_loss_weight", "router_z_loss_coef") if k in d}
    hf = transformers.MellumConfig(**d)
    hf.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text()), ours


@pytest.mark.parametrize("preset", ["mellum2-12b", "mellum2-12b-8k", "tiny", "test-small", "test-small2"])
def test_roundtrip_transformers_config_json_exactly(preset, tmp_path):
    cfg = ModelConfig.from_preset(preset, num_nextn_predict_layers=0)
    written, _ = _hf_config_json(cfg, tmp_path)
    back = ModelConfig.from_hf(tmp_path)
    assert back.to_hf_dict() == written  # every key and value, incl. transformers_version, dtype
    assert back.num_experts == cfg.num_experts and back.layer_types == cfg.layer_types


def test_our_fields_written_only_when_set(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    d = cfg.to_hf_dict()
    assert d["num_nextn_predict_layers"] == 1 and "mtp_loss_weight" not in d
    assert ModelConfig.from_hf(d).num_nextn_predict_layers == 1
    d2 = cfg.replace(router_z_loss_coef=0.0).to_hf_dict()
    assert d2["router_z_loss_coef"] == 0.0
    # transformers accepts our extra keys
    cfg.save(tmp_path / "config.json")
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "mellum" and hf.num_experts == cfg.num_experts


def test_released_architecture():
    c = ModelConfig.from_preset("mellum2-12b")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (28, 2304, 32, 4, 128)
    assert c.layer_types == ["sliding_attention"] * 3 * 1 + ["full_attention"] + \
        (["sliding_attention"] * 3 + ["full_attention"]) * 6
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == list(range(3, 28, 4))
    assert c.sliding_window == 1024 and c.num_experts == 64 and c.num_experts_per_tok == 8
    assert c.moe_intermediate_size == 896 and c.vocab_size == 98304 and c.max_position_embeddings == 131072
    full, sl = c.rope_parameters["full_attention"], c.rope_parameters["sliding_attention"]
    assert full["rope_type"] == "yarn" and full["factor"] == 16 and full["original_max_position_embeddings"] == 8192
    assert full["rope_theta"] == sl["rope_theta"] == 500000.0 and sl["rope_type"] == "default"
    assert full["attention_factor"] == pytest.approx(1.2772588722239782, abs=1e-15)
    assert full["attention_factor"] == pytest.approx(0.1 * math.log(16) + 1)
    assert (c.bos_token_id, c.eos_token_id) == (0, 28)
    c8 = ModelConfig.from_preset("mellum2-12b-8k")
    assert c8.max_position_embeddings == 8192 and c8.rope_parameters["full_attention"]["rope_type"] == "default"


@pytest.mark.parametrize("change, field", [
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(layer_types=["full_attention"] * 3), "layer_types"),
    (dict(mlp_layer_types=["sparse", "moe", "sparse", "sparse"]), "mlp_layer_types"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(num_nextn_predict_layers=2), "num_nextn_predict_layers"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e4}}), "rope_parameters"),
])
def test_invalid_config_names_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_preset("test-small", **change)


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json.*malformed JSON"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type is 'llama', expected 'mellum'"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mellum", "hidden_size": "big"}))
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        ModelConfig.from_preset("nope")
    assert {"mellum2-12b", "mellum2-12b-8k", "tiny"} <= set(PRESETS)


def test_from_spec_takes_a_preset_a_config_json_or_a_checkpoint_dir(tmp_path):
    wide = ModelConfig.from_preset("tiny").replace(hidden_size=512, head_dim=128)
    wide.save(tmp_path / "config.json")
    assert ModelConfig.from_spec("tiny") == ModelConfig.from_preset("tiny")
    assert ModelConfig.from_spec(str(tmp_path / "config.json")).to_hf_dict() == wide.to_hf_dict()
    assert ModelConfig.from_spec(tmp_path).to_hf_dict() == wide.to_hf_dict()
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        ModelConfig.from_spec("nope")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ModelConfig.from_spec(str(tmp_path / "missing.json"))


def test_extend_context_reproduces_the_released_128k_config():
    ext = ModelConfig.from_preset("mellum2-12b-8k").extend_context(16)
    assert ext.to_hf_dict() == ModelConfig.from_preset("mellum2-12b").to_hf_dict()
    both = ModelConfig.from_preset("tiny").extend_context(4, ("full_attention", "sliding_attention"))
    assert {v["rope_type"] for v in both.rope_parameters.values()} == {"yarn"}
    assert ModelConfig.from_preset("tiny").extend_context(4, ()).rope_parameters == \
        ModelConfig.from_preset("tiny").rope_parameters
    with pytest.raises(ConfigError, match="already uses YaRN"):
        ModelConfig.from_preset("mellum2-12b").extend_context(2)
