"""Analytic accounting of a ModelConfig: parameters per component, FLOPs per token, KV-cache bytes.

Every figure here is checked against reality in tests: parameter counts against the model built on
the meta device, FLOPs against torch's FlopCounterMode, KV bytes against the inference engine's cache.

Conventions: "active" parameters count K/E of every expert tensor and the embedding table whole (the
convention behind Mellum 2's "about 2.44B active"). FLOPs count 2 per multiply-accumulate; training
= 3x forward (backward = 2x forward); attention FLOPs use the average number of keys a query sees
under the causal mask (and the window on sliding layers).

`check_memory` compares a model's size with the memory available on its device before anything is
allocated, so a config with an absurd field is refused with its name instead of failing in the allocator.
"""
from __future__ import annotations

import os

import torch

from .config import ConfigError, ModelConfig


def _attn_params(cfg: ModelConfig) -> int:
    D, d = cfg.hidden_size, cfg.head_dim
    return D * cfg.num_attention_heads * d * 2 + D * cfg.num_key_value_heads * d * 2 + 2 * d


def _mlp_params(cfg: ModelConfig, mlp_type: str) -> dict[str, int]:
    D = cfg.hidden_size
    if mlp_type == "dense":
        return {"dense_mlp": 3 * D * cfg.intermediate_size}
    return {"experts": 3 * cfg.num_experts * cfg.moe_intermediate_size * D, "router": cfg.num_experts * D}


def param_table(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """{'trunk': {component: count}, 'mtp': {component: count}} from the config alone."""
    D, V = cfg.hidden_size, cfg.vocab_size
    trunk = {"embedding": V * D, "attention": 0, "experts": 0, "router": 0, "dense_mlp": 0, "norms": D, "lm_head": V * D}
    for mt in cfg.mlp_layer_types:
        trunk["attention"] += _attn_params(cfg)
        trunk["norms"] += 2 * D
        for k, v in _mlp_params(cfg, mt).items():
            trunk[k] += v
    mtp = {}
    if cfg.num_nextn_predict_layers:
        mtp = {"fc": 2 * D * D, "attention": _attn_params(cfg), "experts": 0, "router": 0, "dense_mlp": 0,
               "norms": 3 * D + 2 * D}
        for k, v in _mlp_params(cfg, cfg.mtp_mlp_type).items():
            mtp[k] += v
    return {"trunk": trunk, "mtp": mtp}


def count_params(cfg: ModelConfig, part: str = "trunk", active: bool = False) -> int:
    t = param_table(cfg)
    parts = {"trunk": [t["trunk"]], "mtp": [t["mtp"]], "all": [t["trunk"], t["mtp"]]}[part]
    k, e = cfg.num_experts_per_tok, cfg.num_experts
    return sum((v * k // e if (active and name == "experts") else v) for p in parts for name, v in p.items())


def _avg_keys(T: int, window: int | None) -> float:
    """Mean number of keys a query attends to over a causal sequence of length T."""
    if window is None or window >= T:
        return (T + 1) / 2
    return (window * (window + 1) / 2 + (T - window) * window) / T


def flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool | None = None) -> dict[str, float]:
    """Forward and training FLOPs per token at `seq_len` (MTP included when the config has it)."""
    mtp = bool(cfg.num_nextn_predict_layers) if mtp is None else mtp
    k, e = cfg.num_experts_per_tok, cfg.num_experts
    t = param_table(cfg)["trunk"]
    qk_norms = 2 * cfg.head_dim  # per attention layer, not a matmul
    matmul = t["attention"] - cfg.num_hidden_layers * qk_norms + t["experts"] * k / e + t["router"] \
        + t["dense_mlp"] + t["lm_head"]
    qd = cfg.num_attention_heads * cfg.head_dim
    attn = sum(4 * qd * _avg_keys(seq_len, cfg.window_of(lt)) for lt in cfg.layer_types)
    if mtp and cfg.num_nextn_predict_layers:
        m = param_table(cfg)["mtp"]
        matmul += m["fc"] + m["attention"] - qk_norms + m["experts"] * k / e + m["router"] + m["dense_mlp"] + t["lm_head"]
        attn += 4 * qd * _avg_keys(seq_len, None)
    fwd = 2 * matmul + attn
    return {"forward": fwd, "train": 3 * fwd, "matmul_params": matmul, "attention_forward": attn}


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """K and V of one token in one layer."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def kv_cache_bytes(cfg: ModelConfig, context: int, dtype_bytes: int = 2, batch: int = 1, mtp: bool = False) -> int:
    """Cache bytes for `context` tokens: full layers hold all of them, sliding layers at most a window."""
    per = kv_bytes_per_token(cfg, dtype_bytes)
    n = sum(min(context, cfg.sliding_window) if lt == "sliding_attention" else context for lt in cfg.layer_types)
    if mtp and cfg.num_nextn_predict_layers:
        n += context
    return batch * n * per


# what names each component's size, for the message of a model that cannot fit
_SIZE_FIELDS = {"embedding": "vocab_size x hidden_size", "lm_head": "vocab_size x hidden_size",
                "experts": "num_hidden_layers x num_experts x 3 x moe_intermediate_size x hidden_size",
                "dense_mlp": "num_hidden_layers x 3 x intermediate_size x hidden_size",
                "attention": "num_hidden_layers x (num_attention_heads + num_key_value_heads) x 2 x head_dim x hidden_size",
                "router": "num_hidden_layers x num_experts x hidden_size", "norms": "hidden_size"}


def available_memory(device) -> int | None:
    """Bytes that can be allocated now on `device`: free GPU memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "meta":
        return None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: ModelConfig, bytes_per_param: float, device="cpu", what: str = "the weights",
                 where: str = "the model config") -> int:
    """Refuse, before anything is allocated, a model whose `what` (bytes_per_param per parameter, MTP
    included) cannot fit in the memory available on `device`: ConfigError naming the largest part and
    the fields that size it. Returns the estimate in bytes."""
    t = param_table(cfg)
    need = int(count_params(cfg, "all") * bytes_per_param)
    free = available_memory(device)
    if free is not None and need > free:
        part, n = max(((k, v) for p in t.values() for k, v in p.items()), key=lambda kv: kv[1])
        raise ConfigError(f"{where}: {what} need ~{need / 2**30:,.1f} GiB ({count_params(cfg, 'all'):,} parameters x "
                          f"{bytes_per_param:g} bytes) but {free / 2**30:,.1f} GiB is available on {device}; the "
                          f"largest part is {part} ({n:,} parameters: {_SIZE_FIELDS.get(part, part)}, vocab_size "
                          f"{cfg.vocab_size}, hidden_size {cfg.hidden_size})")
    return need
