"""Checkpoints: parity with transformers' MellumForCausalLM both ways, sharding, layouts, bad input.

Configs: test-small (window 8, dense + sparse layers, YaRN x4 from 32) and test-small2 (window 5,
top-3 of 6 without renormalisation, dense last layer, YaRN x8 from 16 with an explicit attention
factor); sequences of 80 tokens, so windows are shorter than the sequence and positions go past
original_max_position_embeddings.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from mellum2 import CheckpointError, ConfigError, Mellum2, ModelConfig, load_pretrained
from mellum2.model import hf as hfio

transformers = pytest.importorskip("transformers")
PRESETS = ["test-small", "test-small2"]
T = 80


def _hf_model(cfg: ModelConfig):
    d = {k: v for k, v in cfg.to_hf_dict().items() if k != "model_type"}
    for k in ("num_nextn_predict_layers", "mtp_loss_weight", "router_z_loss_coef"):
        d.pop(k, None)
    torch.manual_seed(1)
    m = transformers.MellumForCausalLM(transformers.MellumConfig(**d)).eval()
    with torch.no_grad():  # transformers inits routers to zero-ish; make routing non-trivial
        for n, p in m.named_parameters():
            if n.endswith("mlp.gate.weight") or "experts" in n:
                p.normal_(0, 0.3)
    return m


def _inputs(cfg, packed=False):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    pos = None
    if packed:
        pos = torch.cat([torch.arange(30), torch.arange(50)]).expand(2, T).clone()
    return ids, pos


@pytest.mark.parametrize("preset", PRESETS)
def test_transformers_checkpoint_loads_into_ours(preset, tmp_path):
    cfg = ModelConfig.from_preset(preset, num_nextn_predict_layers=0)
    ref = _hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.mtp is None
    ids, _ = _inputs(cfg)
    with torch.no_grad():
        err = (ref(ids).logits - ours(ids).logits).abs().max().item()
    assert err < 1e-4, (preset, err)


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_rows_match_transformers_per_document(preset, tmp_path):
    """Two documents packed in one row (position_ids restart) give transformers' logits of each
    document run alone. (transformers 5.18's own packed path lets a document's first tokens see the
    previous document through sliding-window layers, so it is not the reference here.)"""
    cfg = ModelConfig.from_preset(preset, num_nextn_predict_layers=0)
    ref = _hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    ids, pos = _inputs(cfg, packed=True)
    with torch.no_grad():
        sep = torch.cat([ref(ids[:, :30]).logits, ref(ids[:, 30:]).logits], 1)
        err = (ours(ids, position_ids=pos).logits - sep).abs().max().item()
    assert err < 1e-4, (preset, err)


@pytest.mark.parametrize("preset", PRESETS)
def test_ours_loads_into_transformers(preset, tmp_path):
    cfg = ModelConfig.from_preset(preset)  # with the MTP head
    torch.manual_seed(3)
    ours = Mellum2(cfg).eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
    ours.save_pretrained(tmp_path)
    cj = json.loads((tmp_path / "config.json").read_text())
    assert cj["model_type"] == "mellum" and cj["architectures"] == ["MellumForCausalLM"]
    assert cj["num_nextn_predict_layers"] == 1
    ref, info = transformers.MellumForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])
    ids, _ = _inputs(cfg)
    with torch.no_grad():
        err = (ref.eval()(ids).logits - ours(ids).logits).abs().max().item()
    assert err < 1e-4, err
    # and back: our reload keeps the MTP head bit-exactly
    again = load_pretrained(tmp_path)
    for (n, p), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n


def test_sharded_save_and_load(tmp_path):
    cfg = ModelConfig.from_preset("test-small")
    m = Mellum2(cfg)
    m.save_pretrained(tmp_path / "ck", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    idx = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in idx["weight_map"]
    back = load_pretrained(tmp_path / "ck")
    for (n, p), (_, q) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n
    ref = transformers.MellumForCausalLM.from_pretrained(tmp_path / "ck")
    ids, _ = _inputs(cfg)
    with torch.no_grad():
        assert (ref(ids).logits - m.eval()(ids).logits).abs().max() < 1e-4


def test_transformers_packed_expert_layout_loads(tmp_path):
    """transformers holds experts as gate_up_proj [E, 2I, D] / down_proj [E, D, I] in memory;
    a file written from that state dict loads too."""
    cfg = ModelConfig.from_preset("test-small", num_nextn_predict_layers=0)
    ref = _hf_model(cfg)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    cfg.save(tmp_path / "config.json")
    ours = load_pretrained(tmp_path)
    ids, _ = _inputs(cfg)
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids).logits).abs().max() < 1e-4


def test_dtype_on_load(tmp_path):
    m = Mellum2(ModelConfig.from_preset("test-small"))
    m.save_pretrained(tmp_path / "bf", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"
    b = load_pretrained(tmp_path / "bf")
    assert next(b.parameters()).dtype == torch.bfloat16
    f = load_pretrained(tmp_path / "bf", dtype="float32")
    assert next(f.parameters()).dtype == torch.float32
    # rotary tables stay fp32 whatever the weights' dtype
    assert b.rotary.tables["full_attention"][0].dtype == torch.float32


# ---------------------------------------------------------------------------- bad input
@pytest.fixture()
def ck(tmp_path):
    m = Mellum2(ModelConfig.from_preset("test-small"))
    m.save_pretrained(tmp_path / "ck", max_shard_bytes=60_000)
    return tmp_path / "ck"


def test_missing_shard(ck):
    shard = sorted(ck.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        load_pretrained(ck)


def test_truncated_shard(ck):
    shard = sorted(ck.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        load_pretrained(ck)
    shard.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(ck)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    m = Mellum2(ModelConfig.from_preset("test-small"))
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"experts\.0\.(gate|up|down)_proj\.weight' has shape .* expected"):
        load_pretrained(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file
    m = Mellum2(ModelConfig.from_preset("test-small"))
    m.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.2.mlp.experts.1.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing weights for model\.layers\.2\.mlp\.experts\.up_proj"):
        load_pretrained(tmp_path)
    sd["model.layers.2.mlp.experts.1.up_proj.weight"] = torch.zeros(32, 64)
    sd["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9"):
        load_pretrained(tmp_path)


def test_bad_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "nope")
    ModelConfig.from_preset("test-small").save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="malformed index"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ConfigError, match="expected 'mellum'"):
        load_pretrained(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    m = Mellum2(ModelConfig.from_preset("test-small"))
    m.save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)

    real = hfio.save_file
    monkeypatch.setattr(hfio, "save_file", boom)
    m2 = Mellum2(ModelConfig.from_preset("test-small"))
    with pytest.raises(OSError, match="disk full"):
        m2.save_pretrained(tmp_path / "ck", max_shard_bytes=60_000)
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        m2.save_pretrained(tmp_path / "new", max_shard_bytes=60_000)
    # the old checkpoint is untouched, no partial new one, no temp directories left behind
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
