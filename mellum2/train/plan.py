"""`mellum2 plan`: memory per GPU and step time / tokens per day of a training layout, from the
config alone (no GPU needed).

What is counted, per GPU:
- weights, gradients, optimiser states: exact bytes of this trainer (fp32 masters and gradients;
  Muon keeps one fp32 momentum per matrix, AdamW two fp32 moments and a 0-d fp32 step per tensor:
  the split of train/optim.py, read off a model built on the meta device). Experts are divided over
  EP ranks and, with FSDP, everything is divided over the ranks that shard it (FSDP2 shards dim 0
  over all ranks; with EP the expert stacks are split by EP instead, replicated over the N / EP
  data-parallel groups, each of which FSDP then shards, as torchtitan lays them out).
  tests/test_plan.py checks these three against a real run to the byte.
- FSDP working set: the unsharded parameters and gradients of two decoder layers at a time
  (the one computing and the one prefetched), fp32.
- activations: an estimate of what autograd saves per token and layer under bf16 autocast (the
  formula is `activation_bytes_per_token`; the test compares it with the bytes per token a real
  forward saves, measured with saved-tensor hooks), and the bf16 copies of the weights that autocast
  makes and keeps for backward (of the whole unsharded model: FSDP frees its fp32 gathers after each
  layer, but the casts stay saved). With activation checkpointing only each layer's input stays, plus
  one layer recomputed at a time (and its weight copies).
- all-to-all buffers (EP): the dispatched rows of one MoE layer, sent and received, forward and back.

Step time: matmul FLOPs (accounting.flops_per_token; +1 forward with activation checkpointing) at an
assumed share of the GPU's peak (`--mfu`, default 0.4; FP8 doubles the peak for the expert and
attention matmuls it converts), Muon's Newton-Schulz FLOPs, and communication at the link bandwidth:
FSDP all-gathers (forward and backward) and reduce-scatters the sharded fp32 parameters, EP sends
every routed row twice per MoE layer each way. Communication is assumed to overlap with compute
(step = max), and the sum is given as the no-overlap bound. GPU figures are vendor datasheet values
(dense, no sparsity); a GPU not in the table takes --peak-tflops / --mem-gib / --link-gbs.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from mellum2.errors import MellumError
from mellum2.model import Mellum2, ModelConfig
from mellum2.model.accounting import flops_per_token

from .optim import param_role


class PlanError(MellumError, ValueError):
    """A layout that cannot be planned as given (the message says which argument)."""


@dataclass(frozen=True)
class GPU:
    bf16_tflops: float  # dense
    fp8_tflops: float
    mem_gib: float
    intra_gbs: float  # NVLink, per GPU per direction, GB/s
    inter_gbs: float  # network, per GPU, GB/s
    per_node: int = 8


GPUS = {
    "h200": GPU(989, 1979, 141 * 1e9 / 2**30, 450, 50),
    "h100": GPU(989, 1979, 80, 450, 50),
    "b200": GPU(2250, 4500, 180 * 1e9 / 2**30, 900, 50),
    "a100": GPU(312, 312, 80, 300, 25),
}
GIB = 2**30


@dataclass
class Layout:
    gpus: int = 1
    ep: int = 1
    fsdp: bool = True
    ac: bool = False
    fp8: bool = False
    micro_batch: int = 1  # sequences per GPU per micro-batch
    seq: int = 8192
    grad_accum: int = 1

    def check(self, cfg: ModelConfig) -> None:
        if self.gpus < 1 or self.ep < 1 or self.gpus % self.ep:
            raise PlanError(f"--ep {self.ep} must divide --gpus {self.gpus}")
        if cfg.num_experts and cfg.num_experts % self.ep:
            raise PlanError(f"--ep {self.ep} must divide the {cfg.num_experts} experts")


def param_groups(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """Elements and tensors per (expert?, optimiser) group, from a model built on the meta device."""
    with torch.device("meta"):
        model = Mellum2(cfg)
    out = {f"{kind}_{opt}": {"numel": 0, "tensors": 0} for kind in ("experts", "rest") for opt in ("muon", "adamw")}
    for name, p in model.named_parameters():
        kind = "experts" if ".experts." in name else "rest"
        opt = "muon" if param_role(name, p) == "muon" else "adamw"
        out[f"{kind}_{opt}"]["numel"] += p.numel()
        out[f"{kind}_{opt}"]["tensors"] += 1
    return out


def static_bytes(cfg: ModelConfig, lay: Layout) -> dict[str, float]:
    """Weights, gradients and optimiser state on one GPU (bytes; exact for one GPU)."""
    g = param_groups(cfg)
    shard_rest = lay.gpus if lay.fsdp else 1
    shard_exp = lay.ep * (lay.gpus // lay.ep if lay.fsdp else 1)
    n_exp = g["experts_muon"]["numel"] + g["experts_adamw"]["numel"]
    n_rest = g["rest_muon"]["numel"] + g["rest_adamw"]["numel"]
    per = n_exp / shard_exp + n_rest / shard_rest
    muon = g["experts_muon"]["numel"] / shard_exp + g["rest_muon"]["numel"] / shard_rest
    adamw = g["experts_adamw"]["numel"] / shard_exp + g["rest_adamw"]["numel"] / shard_rest
    steps = g["experts_adamw"]["tensors"] + g["rest_adamw"]["tensors"]  # a 0-d fp32 step per tensor
    return {"weights": 4 * per, "grads": 4 * per, "optimizer": 4 * muon + 8 * adamw + 4 * steps}


def activation_bytes_per_token(cfg: ModelConfig) -> dict[str, float]:
    """Bytes autograd keeps per token: per decoder layer (bf16 autocast, fp32 residual stream), the
    per-layer input that activation checkpointing keeps instead, and the rest (embedding, head)."""
    D, E, K, I = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    b = 2  # bf16
    # attention: norm in/out, q/k/v, the QK-norms' fp32 inputs, rotated q/k, output (+ its logsumexp),
    # the residual stream (fp32)
    attn = 4 * D + b * D + b * (qd + 2 * kvd) * 2 + 4 * (qd + kvd) + b * qd + 4 * cfg.num_attention_heads + 4 * D
    # MoE: norm in/out, router input fp32 and its probabilities, dispatched rows, gate|up, silu*up, down out
    moe = 4 * D + b * D + 4 * D + 8 * E + 16 * K + b * K * (D + 2 * I + 2 * I + D)
    dense = 4 * D + b * D + b * 3 * cfg.intermediate_size
    layers = [attn + (moe if mt == "sparse" else dense) for mt in cfg.mlp_layer_types]
    if cfg.num_nextn_predict_layers:
        layers.append(attn + (moe if cfg.mtp_mlp_type == "sparse" else dense) + 4 * 2 * D)
    return {"layers": sum(layers), "max_layer": max(layers), "layer_inputs": 4 * D * len(layers),
            "other": 4 * D + b * D + 4 * D}


def plan(cfg: ModelConfig, gpu: GPU, lay: Layout, mfu: float = 0.4) -> dict:
    lay.check(cfg)
    st = static_bytes(cfg, lay)
    tok_mb = lay.micro_batch * lay.seq  # tokens per GPU per micro-batch
    act = activation_bytes_per_token(cfg)
    act_bytes = tok_mb * ((act["layer_inputs"] + act["max_layer"]) if lay.ac else act["layers"]) + tok_mb * act["other"]
    g = param_groups(cfg)
    n_layers = len(cfg.mlp_layer_types) + cfg.num_nextn_predict_layers
    n_exp = g["experts_muon"]["numel"] + g["experts_adamw"]["numel"]
    n_rest = g["rest_muon"]["numel"] + g["rest_adamw"]["numel"]
    layer_full = (n_exp / lay.ep + n_rest) / n_layers  # an unsharded layer (roughly: embeddings spread)
    fsdp_ws = 2 * 2 * 4 * layer_full if (lay.fsdp and lay.gpus > 1) else 0.0
    K, D = cfg.num_experts_per_tok, cfg.hidden_size
    a2a = 4 * tok_mb * K * D * 2 if lay.ep > 1 else 0.0
    emb = cfg.vocab_size * cfg.hidden_size  # the embedding is looked up, not cast
    copies = 2 * (n_exp / lay.ep + n_rest - emb)
    weight_copies = copies / n_layers if lay.ac else copies
    mem = {**st, "fsdp_working_set": fsdp_ws, "activations": act_bytes, "autocast_weight_copies": weight_copies,
           "all_to_all": a2a}
    mem["total"] = sum(mem.values())

    # ---- time of one optimiser step
    f = flops_per_token(cfg, lay.seq)
    tokens_gpu = tok_mb * lay.grad_accum
    fwd = f["forward"] * tokens_gpu
    train_flops = (4 if lay.ac else 3) * fwd
    peak = gpu.bf16_tflops * 1e12
    if lay.fp8:  # the converted matmuls (experts, q/k/v/o) at the FP8 peak
        share = _fp8_share(cfg, lay.seq)
        compute = train_flops * ((1 - share) / peak + share / (gpu.fp8_tflops * 1e12)) / mfu
    else:
        compute = train_flops / (peak * mfu)
    muon_flops = _muon_flops(cfg, lay)
    optimizer = muon_flops / (peak * mfu)
    intra = lay.gpus <= gpu.per_node
    fsdp_bw = (gpu.intra_gbs if intra else gpu.inter_gbs) * 1e9
    ep_bw = (gpu.intra_gbs if lay.ep <= gpu.per_node else gpu.inter_gbs) * 1e9
    fsdp_bytes = 0.0
    if lay.fsdp and lay.gpus > 1:
        dp_exp = lay.gpus // lay.ep
        frac = lambda n: (n - 1) / n  # noqa: E731 - ring collective share
        # all-gather in forward and backward, reduce-scatter of grads, fp32, per micro-batch for the
        # gathers (reshard after forward) and once per step for the reduce-scatter
        fsdp_bytes = 4 * n_rest * frac(lay.gpus) * (2 * lay.grad_accum + 1)
        if dp_exp > 1:
            fsdp_bytes += 4 * n_exp / lay.ep * frac(dp_exp) * (2 * lay.grad_accum + 1)
    moe_layers = sum(mt == "sparse" for mt in cfg.mlp_layer_types) + (cfg.num_nextn_predict_layers if
                                                                       cfg.mtp_mlp_type == "sparse" else 0)
    ep_bytes = (4 * tokens_gpu * K * D * 2 * (lay.ep - 1) / lay.ep * moe_layers) if lay.ep > 1 else 0.0
    comm = fsdp_bytes / fsdp_bw + ep_bytes / ep_bw
    step = max(compute, comm) + optimizer
    tokens_step = tokens_gpu * lay.gpus
    return {
        "memory_gib": {k: v / GIB for k, v in mem.items()},
        "fits": mem["total"] <= gpu.mem_gib * GIB,
        "gpu_mem_gib": gpu.mem_gib,
        "time_s": {"compute": compute, "optimizer": optimizer, "fsdp_comm": fsdp_bytes / fsdp_bw,
                   "ep_comm": ep_bytes / ep_bw, "step": step, "step_no_overlap": compute + comm + optimizer},
        "tokens_per_step": tokens_step,
        "tokens_per_s": tokens_step / step,
        "tokens_per_day": tokens_step / step * 86400,
        "train_flops_per_token": f["train"],
        "mfu_assumed": mfu,
    }


def _fp8_share(cfg: ModelConfig, seq: int) -> float:
    """Share of the training matmul FLOPs in the expert and attention projections (what FP8 converts)."""
    f = flops_per_token(cfg, seq)
    D, V = cfg.hidden_size, cfg.vocab_size
    head = 2 * D * V * (1 + bool(cfg.num_nextn_predict_layers))
    router = 2 * cfg.num_experts * D * len(cfg.mlp_layer_types)
    return max(0.0, (f["forward"] - f["attention_forward"] - head - router) / f["forward"])


def _muon_flops(cfg: ModelConfig, lay: Layout) -> float:
    """Newton-Schulz FLOPs on one GPU: 5 steps of (4 R^2 C + 2 R^3) per matrix (R <= C); expert
    matrices split over the ranks that hold them, 2-D matrices orthogonalised on every rank."""
    with torch.device("meta"):
        model = Mellum2(cfg)
    total = 0.0
    for name, p in model.named_parameters():
        if param_role(name, p) != "muon":
            continue
        R, C = sorted(p.shape[-2:])
        n = p.numel() // (R * C)
        per = 5 * (4 * R * R * C + 2 * R ** 3)
        split = lay.gpus if (p.ndim == 3 and (lay.fsdp or lay.ep > 1)) else 1
        total += per * n / split
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mellum2 plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", default="mellum2-12b", help="preset name or config.json / checkpoint directory")
    ap.add_argument("--gpu", default="h200", help=f"one of {', '.join(GPUS)}, or 'custom' with the three below")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (FP8 = 2x)")
    ap.add_argument("--mem-gib", type=float, default=None)
    ap.add_argument("--link-gbs", type=float, default=None, help="GB/s per GPU for collectives")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel degree")
    ap.add_argument("--no-fsdp", action="store_true")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per decoder layer")
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per GPU per micro-batch")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed share of peak the matmuls reach")
    ap.add_argument("--no-mtp", action="store_true", help="plan the trunk alone (the config's MTP layer off)")
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    a = ap.parse_args(argv)
    gpu = GPUS.get(a.gpu.lower())
    if gpu is None:
        if a.gpu != "custom" or None in (a.peak_tflops, a.mem_gib, a.link_gbs):
            raise PlanError(f"--gpu {a.gpu!r}: known GPUs are {', '.join(GPUS)}; or --gpu custom with "
                            f"--peak-tflops, --mem-gib and --link-gbs")
        gpu = GPU(a.peak_tflops, 2 * a.peak_tflops, a.mem_gib, a.link_gbs, a.link_gbs)
    elif a.peak_tflops or a.mem_gib or a.link_gbs:
        gpu = GPU(a.peak_tflops or gpu.bf16_tflops, 2 * (a.peak_tflops or gpu.bf16_tflops) if a.peak_tflops else
                  gpu.fp8_tflops, a.mem_gib or gpu.mem_gib, a.link_gbs or gpu.intra_gbs, a.link_gbs or gpu.inter_gbs)
    cfg = ModelConfig.from_spec(a.config)
    if a.no_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    lay = Layout(gpus=a.gpus, ep=a.ep, fsdp=not a.no_fsdp, ac=a.ac, fp8=a.fp8, micro_batch=a.micro_batch,
                 seq=a.seq, grad_accum=a.grad_accum)
    r = plan(cfg, gpu, lay, a.mfu)
    if not a.json:
        print(f"{a.config} on {a.gpus} x {a.gpu} (EP {a.ep}, FSDP {'on' if lay.fsdp else 'off'}, AC "
              f"{'on' if a.ac else 'off'}, {'FP8' if a.fp8 else 'bf16'}), {a.micro_batch} x {a.seq} tokens per GPU "
              f"per micro-batch, {a.grad_accum} micro-batches")
        print("memory per GPU (GiB):")
        for k, v in r["memory_gib"].items():
            print(f"  {k:<18}{v:>10.2f}")
        print(f"  {'fits in':<18}{gpu.mem_gib:>10.1f} GiB: {'yes' if r['fits'] else 'NO'}")
        t = r["time_s"]
        print(f"step: {t['step']:.3f} s (compute {t['compute']:.3f} at {a.mfu:.0%} of peak, Muon {t['optimizer']:.3f}, "
              f"FSDP comm {t['fsdp_comm']:.3f}, EP comm {t['ep_comm']:.3f}; no overlap {t['step_no_overlap']:.3f})")
        print(f"{r['tokens_per_step']:,} tokens per step, {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['tokens_per_day'] / 1e9:,.2f}B tokens/day")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
