"""ModelConfig: one flat dataclass for the Mellum 2 architecture, its presets and its HF config.json.

Every field of transformers' `MellumConfig` (5.18) is here under the same name, so `from_hf` /
`to_hf_dict` round-trip a config.json written by transformers exactly (keys we do not model, such as
`transformers_version` or `dtype`, are carried in `extra`). Three fields are ours:
`num_nextn_predict_layers` (MTP layers, 0 or 1), `mtp_loss_weight` and `router_z_loss_coef`; they are
written to config.json only when they differ from their defaults, so a released config stays byte-equal.

Derived values (head counts per group, which layers are sparse, the rope table of each layer type)
are computed in `validate()` / properties below and nowhere else.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mellum2.errors import MellumError, NotFoundError

LAYER_TYPES = ("sliding_attention", "full_attention")
MLP_TYPES = ("sparse", "dense")
ROPE_TYPES = ("default", "yarn")

# fields of ours that transformers does not know; written only when not at their default
_OUR_FIELDS = ("num_nextn_predict_layers", "mtp_loss_weight", "router_z_loss_coef")
# HF name -> our name (transformers' attribute_map for Mellum)
_HF_RENAMES = {"num_local_experts": "num_experts"}


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "moe_intermediate_size", "num_experts_per_tok",
               "num_experts", "head_dim", "num_nextn_predict_layers")
_NUMBER_FIELDS = (("initializer_range", 0.0, None), ("rms_norm_eps", 0.0, None), ("attention_dropout", 0.0, 1.0),
                  ("router_aux_loss_coef", 0.0, None), ("mtp_loss_weight", 0.0, None),
                  ("router_z_loss_coef", 0.0, None))
_BOOL_FIELDS = ("use_cache", "tie_word_embeddings", "attention_bias", "norm_topk_prob", "output_router_logits")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class ConfigError(MellumError, ValueError):
    """An invalid or unsupported model configuration; the message names the field."""


@dataclass
class ModelConfig:
    # --- transformers' MellumConfig fields (same names, same defaults as the released model) ---
    vocab_size: int = 98304
    hidden_size: int = 2304
    intermediate_size: int = 7168
    num_hidden_layers: int = 28
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, dict[str, Any]] | None = None
    attention_bias: bool = False
    sliding_window: int | None = 1024
    attention_dropout: float = 0.0
    moe_intermediate_size: int = 896
    num_experts_per_tok: int = 8
    num_experts: int = 64
    norm_topk_prob: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    head_dim: int = 128
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    # --- ours ---
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.1
    router_z_loss_coef: float = 1e-3
    # keys of a config.json we do not model (transformers_version, dtype, architectures...)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("layer_types", "mlp_layer_types"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (list, tuple)):
                raise ConfigError(f"ModelConfig.{name}: expected a list of strings (got {v!r})")
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * self.num_hidden_layers
        if self.rope_parameters is None:  # transformers' class default
            self.rope_parameters = {
                "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            }
        self.layer_types = list(self.layer_types)
        self.mlp_layer_types = list(self.mlp_layer_types)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ConfigError(f"ModelConfig.{name}: {msg} (got {getattr(self, name, None)!r})")

        self._check_types(need)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            need(getattr(self, name) > 0, name, "expected a positive int")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             f"must be a multiple of num_key_value_heads={self.num_key_value_heads}")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU) is supported")
        need(not self.attention_bias, "attention_bias", "Mellum has no attention biases")
        need(not self.tie_word_embeddings, "tie_word_embeddings", "Mellum's head is untied")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"expected {self.num_hidden_layers} entries")
        need(all(t in LAYER_TYPES for t in self.layer_types), "layer_types", f"entries must be in {LAYER_TYPES}")
        need(len(self.mlp_layer_types) == self.num_hidden_layers, "mlp_layer_types",
             f"expected {self.num_hidden_layers} entries")
        need(all(t in MLP_TYPES for t in self.mlp_layer_types), "mlp_layer_types", f"entries must be in {MLP_TYPES}")
        if "sliding_attention" in self.layer_types:
            need(isinstance(self.sliding_window, int) and self.sliding_window > 0, "sliding_window",
                 "sliding layers need a positive window")
        if "sparse" in self.mlp_layer_types or self.num_nextn_predict_layers:
            need(self.num_experts >= 1, "num_experts", "expected >= 1")
            need(1 <= self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                 f"expected 1..num_experts={self.num_experts}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "expected > 0")
        if "dense" in self.mlp_layer_types:
            need(self.intermediate_size > 0, "intermediate_size", "expected > 0")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers", "expected 0 or 1")
        need(isinstance(self.rope_parameters, dict), "rope_parameters", "expected a dict per layer type")
        for lt in set(self.layer_types):
            rp = self.rope_parameters.get(lt)
            need(isinstance(rp, dict), "rope_parameters", f"missing the entry for layer type {lt!r}")
            need(rp.get("rope_type", "default") in ROPE_TYPES, "rope_parameters",
                 f"{lt}.rope_type must be one of {ROPE_TYPES}")
            need(isinstance(rp.get("rope_theta"), (int, float)) and rp["rope_theta"] > 0, "rope_parameters",
                 f"{lt}.rope_theta must be a positive number")
            if rp.get("rope_type") == "yarn":
                need(isinstance(rp.get("factor"), (int, float)) and rp["factor"] >= 1, "rope_parameters",
                     f"{lt}.factor must be >= 1 for yarn")
                need(isinstance(rp.get("original_max_position_embeddings"), int), "rope_parameters",
                     f"{lt}.original_max_position_embeddings must be an int for yarn")

    def _check_types(self, need) -> None:
        """Every field's type (and the range of the plain numbers), field by field, before any arithmetic."""
        for name in _INT_FIELDS:
            need(_is_int(getattr(self, name)), name, "expected an integer")
        for name, low, high in _NUMBER_FIELDS:
            v = getattr(self, name)
            need(_is_number(v), name, "expected a finite number")
            need(v >= low and (high is None or v <= high), name,
                 f"expected a number >= {low:g}" + (f" and <= {high:g}" if high is not None else ""))
            if name == "rms_norm_eps":
                need(v > 0, name, "expected a positive number")
        for name in _BOOL_FIELDS:
            need(isinstance(getattr(self, name), bool), name, "expected true or false")
        need(isinstance(self.hidden_act, str), "hidden_act", "expected a string")
        for name in ("sliding_window", "pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            need(v is None or (_is_int(v) and v >= 0), name, "expected null or an integer >= 0")
        eos = self.eos_token_id
        need(eos is None or (_is_int(eos) and eos >= 0)
             or (isinstance(eos, list) and all(_is_int(x) and x >= 0 for x in eos)),
             "eos_token_id", "expected null, an integer >= 0 or a list of them")
        for name in ("layer_types", "mlp_layer_types"):
            need(all(isinstance(t, str) for t in getattr(self, name)), name, "expected a list of strings")

    # ------------------------------------------------------------------ derived values
    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def mtp_layer_type(self) -> str:
        """The MTP decoder layer is a full-attention layer (see mtp.py for why)."""
        return "full_attention"

    @property
    def mtp_mlp_type(self) -> str:
        return "sparse" if "sparse" in self.mlp_layer_types else "dense"

    def window_of(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == "sliding_attention" else None

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def replace(self, **changes) -> "ModelConfig":
        d = dataclasses.asdict(self)
        d.update(changes)
        return ModelConfig(**d)

    def extend_context(self, factor: float, layer_types=("full_attention",)) -> "ModelConfig":
        """Mellum 2's context extension: YaRN (factor, original = the current context, beta 32/1,
        attention factor 0.1 ln(factor) + 1) on the listed layer types, plain RoPE elsewhere;
        max_position_embeddings grows by `factor`. layer_types=() keeps RoPE unchanged everywhere
        (the ablation's baseline), ("full_attention", "sliding_attention") is uniform YaRN."""
        if factor < 1:
            raise ConfigError(f"extend_context: factor must be >= 1 (got {factor})")
        rp = copy.deepcopy(self.rope_parameters)
        orig = self.max_position_embeddings
        for lt in layer_types:
            if lt not in rp:
                raise ConfigError(f"extend_context: no rope_parameters entry for layer type {lt!r}")
            if rp[lt].get("rope_type") == "yarn":
                raise ConfigError(f"extend_context: {lt} already uses YaRN (factor {rp[lt]['factor']})")
            rp[lt] = yarn_rope(rp[lt]["rope_theta"], factor, orig)
        return self.replace(rope_parameters=rp, max_position_embeddings=int(orig * factor))

    # ------------------------------------------------------------------ HF config.json
    def to_hf_dict(self) -> dict[str, Any]:
        """transformers' config.json form: HF names, our extra fields only when non-default."""
        d: dict[str, Any] = {}
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
        inv = {v: k for k, v in _HF_RENAMES.items()}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = copy.deepcopy(getattr(self, f.name))
            if f.name in _OUR_FIELDS and v == defaults[f.name]:
                continue
            d[inv.get(f.name, f.name)] = v
        d.update(copy.deepcopy(self.extra))
        d["model_type"] = "mellum"
        return d

    @classmethod
    def from_hf(cls, src: str | Path | dict[str, Any]) -> "ModelConfig":
        """From a checkpoint directory, a config.json path, or an already-parsed dict."""
        where = "config dict"
        if not isinstance(src, dict):
            p = Path(src)
            if p.is_dir():
                p = p / "config.json"
            where = str(p)
            if not p.exists():
                raise NotFoundError(f"{p}: no config.json (expected a Hugging Face checkpoint directory)")
            try:
                src = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: malformed JSON: {e}") from None
            if not isinstance(src, dict):
                raise ConfigError(f"{p}: expected a JSON object at the top level")
        d = copy.deepcopy(src)
        mt = d.get("model_type")
        if mt != "mellum":
            raise ConfigError(f"{where}: model_type is {mt!r}, expected 'mellum'")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in d.items():
            name = _HF_RENAMES.get(k, k)
            if name in known:
                kwargs[name] = v
            else:
                extra[k] = v
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        cfg = PRESETS[name]()
        return cfg.replace(**overrides) if overrides else cfg

    @classmethod
    def from_spec(cls, spec: str | Path) -> "ModelConfig":
        """What a `--config` flag names: a preset, a config.json path or a checkpoint directory."""
        spec = str(spec)
        if spec.endswith(".json") or Path(spec).is_dir():
            return cls.from_hf(spec)
        return cls.from_preset(spec)


def yarn_rope(theta: float, factor: float, original: int) -> dict[str, Any]:
    """The full-attention rope entry of a YaRN-extended checkpoint, in the released form."""
    return {
        "rope_type": "yarn",
        "rope_theta": float(theta),
        "factor": float(factor),
        "original_max_position_embeddings": int(original),
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "attention_factor": 0.1 * math.log(factor) + 1.0,
    }


def _pattern(n_groups: int) -> list[str]:
    return ["sliding_attention"] * 3 + ["full_attention"] if n_groups == 1 else _pattern(1) * n_groups


def _mellum2_12b() -> ModelConfig:
    return ModelConfig(
        layer_types=_pattern(7),
        mlp_layer_types=["sparse"] * 28,
        rope_parameters={
            "full_attention": yarn_rope(500000.0, 16.0, 8192),
            "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
        },
        bos_token_id=0,
        eos_token_id=28,
        num_nextn_predict_layers=1,
    )


def _mellum2_12b_8k() -> ModelConfig:
    return _mellum2_12b().replace(
        max_position_embeddings=8192,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
        },
    )


def _tiny() -> ModelConfig:
    """Mellum 2's structure at CPU scale (~18M params, ~7M active): 3:1 sliding/full, GQA, QK-norm,
    16 experts top-2, MTP on. Native context 1024 (window 256); theta 10000 suits such short contexts."""
    return ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        sliding_window=256, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=2,
        layer_types=_pattern(2), mlp_layer_types=["sparse"] * 8,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        bos_token_id=0, eos_token_id=28, num_nextn_predict_layers=1,
    )


def _test_small() -> ModelConfig:
    """A very small config for unit tests: mixed dense/sparse, a window of 8, YaRN x4 from 32."""
    return ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        sliding_window=8, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        layer_types=_pattern(1), mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        rope_parameters={
            "full_attention": yarn_rope(10000.0, 4.0, 32),
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=1,
    )


def _test_small2() -> ModelConfig:
    """A second test config: 8 layers, MHA-free GQA 8:2, top-3 of 6 experts, dense last layer,
    window 5, YaRN x8 from 16 with an explicit (non-derived) attention factor."""
    rp = yarn_rope(500000.0, 8.0, 16)
    rp["attention_factor"] = 1.3
    return ModelConfig(
        vocab_size=320, hidden_size=96, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
        sliding_window=5, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
        norm_topk_prob=False,
        layer_types=_pattern(2), mlp_layer_types=["sparse"] * 7 + ["dense"],
        rope_parameters={
            "full_attention": rp,
            "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
        },
        bos_token_id=0, eos_token_id=[1, 2], num_nextn_predict_layers=1,
    )


PRESETS = {
    "mellum2-12b": _mellum2_12b,
    "mellum2-12b-8k": _mellum2_12b_8k,
    "tiny": _tiny,
    "test-small": _test_small,
    "test-small2": _test_small2,
}
