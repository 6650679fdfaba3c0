"""`mellum2 info --preset NAME | --model DIR`: parameters per component, active parameters,
training FLOPs per token and KV-cache bytes, for a preset or a checkpoint's config.

The model is built on the meta device (seconds even for the 12B preset) and the real parameter
counts are checked against the analytic table of accounting.py before anything is printed.
"""
from __future__ import annotations

import argparse
import json

import torch

from .accounting import count_params, flops_per_token, kv_bytes_per_token, kv_cache_bytes, param_table
from .config import PRESETS, ModelConfig
from .transformer import Mellum2


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def report(cfg: ModelConfig) -> dict:
    """All figures of `mellum2 info` as a dict (also printed as JSON with --json)."""
    with torch.device("meta"):
        model = Mellum2(cfg)
    real = {p: model.num_params(p) for p in ("trunk", "mtp")}
    for p in real:  # the analytic table must describe the real model
        assert real[p] == count_params(cfg, p), (p, real[p], count_params(cfg, p))
    ctx = cfg.max_position_embeddings
    train_T = min(ctx, cfg.rope_parameters["full_attention"].get("original_max_position_embeddings", ctx)) \
        if "full_attention" in cfg.rope_parameters else ctx
    return {
        "table": param_table(cfg),
        "total": real["trunk"],
        "mtp": real["mtp"],
        "active": model.num_active_params("trunk"),
        "active_mtp": model.num_active_params("mtp"),
        "flops_seq_len": train_T,
        "train_flops_per_token": flops_per_token(cfg, train_T, mtp=False)["train"],
        "train_flops_per_token_mtp": flops_per_token(cfg, train_T, mtp=True)["train"],
        "kv_bytes_per_token_per_layer_bf16": kv_bytes_per_token(cfg, 2),
        "kv_bytes_bf16": {c: kv_cache_bytes(cfg, c, 2) for c in (8192, 32768, 131072)},
        "kv_bytes_per_token_bf16_at_128k": kv_cache_bytes(cfg, 131072, 2) / 131072,
    }


def print_report(name: str, cfg: ModelConfig, r: dict) -> None:
    print(f"{name}: {cfg.num_hidden_layers} layers x {cfg.hidden_size}, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads x {cfg.head_dim}, "
          f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok} x {cfg.moe_intermediate_size}, "
          f"vocab {cfg.vocab_size}, window {cfg.sliding_window}, context {cfg.max_position_embeddings}")
    print(f"\n{'component':<12}{'trunk':>18}{'MTP head':>16}")
    t, m = r["table"]["trunk"], r["table"]["mtp"]
    for k in sorted(set(t) | set(m), key=lambda k: -t.get(k, 0)):
        if t.get(k, 0) or m.get(k, 0):
            print(f"{k:<12}{t.get(k, 0):>18,}{m.get(k, 0):>16,}")
    print(f"{'total':<12}{r['total']:>18,}{r['mtp']:>16,}")
    print(f"\nparameters (trunk): {r['total']:,} ({_fmt(r['total'])}); MTP head: {r['mtp']:,} "
          f"(shares embedding and LM head)")
    print(f"active per token (trunk): {r['active']:,} ({_fmt(r['active'])}; K/E of experts, embedding counted whole)")
    print(f"training FLOPs per token at {r['flops_seq_len']} tokens: {_fmt(r['train_flops_per_token'])} "
          f"(with MTP: {_fmt(r['train_flops_per_token_mtp'])})")
    print(f"KV cache (bf16): {r['kv_bytes_per_token_per_layer_bf16']:,} B per token per layer")
    for c, b in r["kv_bytes_bf16"].items():
        print(f"  at {c // 1024:>4}K context: {_bytes(b):>12}  ({b / c / 1024:.1f} KiB per token; sliding layers "
              f"capped at {cfg.sliding_window})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mellum2 info", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--model", help="checkpoint directory (reads its config.json)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    a = ap.parse_args(argv)
    cfg = ModelConfig.from_preset(a.preset) if a.preset else ModelConfig.from_hf(a.model)  # errors name the file
    r = report(cfg)
    if a.json:
        print(json.dumps(r))
    else:
        print_report(a.preset or a.model, cfg, r)
    return 0
