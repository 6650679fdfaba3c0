"""The Mellum 2 model: decoder layers, the causal LM with its losses, initialisation and parameter counts.

Module names follow the released checkpoint (`model.embed_tokens`, `model.layers.{l}.self_attn.q_proj`,
`model.layers.{l}.mlp.gate`, `model.norm`, `lm_head`), so the HF state dict maps 1:1 except for the
experts, which we hold packed per kind (moe.py) and hf.py splits per expert on save.

Precision policy (the one place it is decided): parameters are fp32 masters for training (or bf16
for inference); matmuls follow torch.autocast when enabled; router logits/softmax (moe.Router),
RMSNorm statistics, rotary tables and the LM logits are fp32.

Losses (`forward(..., labels=...)`; labels are the input ids with -100 where no loss is wanted,
shifted inside, as in transformers): the terms CE, MTP-CE, load balancing and router z-loss, and
`out.loss`, their weighted sum, are defined in objective.py (the one objective the trainers use too).

`load_pretrained` builds the model for a checkpoint's config on the meta device, allocates it once in
the target dtype and fills it (hf.load_weights); `save_pretrained` writes the released layout (hf.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import hf
from .accounting import check_memory
from .config import ConfigError, ModelConfig
from .decoder import DecoderLayer, packed_doc_ids
from .head_loss import linear_ce
from .layers import MaskCache, RMSNorm, Rotary
from .moe import Experts, Router, RouterOut
from .mtp import MTP
from .objective import load_balance_loss, loss_weights, objective, router_losses, shifted_ce

# DecoderLayer, packed_doc_ids (decoder.py), shifted_ce and load_balance_loss (objective.py) are
# importable from here too, where they were defined before
__all__ = ["Mellum2", "Output", "Trunk", "init_weights", "load_pretrained", "DecoderLayer", "packed_doc_ids",
           "shifted_ce", "load_balance_loss"]


class Trunk(nn.Module):
    """`model.*` in the checkpoint: embedding, decoder layers, final norm (applied by the LM)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, cfg.layer_types[i], cfg.mlp_layer_types[i]) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class Output:
    logits: torch.Tensor | None  # [B, T, V] fp32 (None when forward(..., return_logits=False))
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # ce, mtp, lb, z (unweighted)
    hidden: torch.Tensor | None = None  # [B, T, D] trunk output before the final norm
    mtp_logits: torch.Tensor | None = None  # [B, T-1, V]: position t predicts token t+2 (or None, as logits)
    routers: list[RouterOut] = field(default_factory=list)  # per MoE layer (trunk, then MTP)
    n_tokens: torch.Tensor | None = None  # label tokens counted by the CE


class Mellum2(nn.Module):
    """Mellum 2 causal LM (+ optional MTP head). `Mellum2(cfg)` is randomly initialised on the current
    default device; under `torch.device("meta")` nothing is allocated or initialised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = MTP(cfg) if cfg.num_nextn_predict_layers else None
        self.rotary = Rotary(cfg)
        self.count_reducer = None  # e.g. all-reduce of routed-slot counts over ranks (global-batch LB)
        self.ce = shifted_ce  # train/parallel.py swaps in a compiled version (fused cast + log-softmax)
        if not self.lm_head.weight.is_meta:
            init_weights(self)

    # ------------------------------------------------------------------ pieces (engine, trainer)
    def rope(self, position_ids_BT, dtype):
        return {lt: self.rotary(position_ids_BT, lt, dtype) for lt in self.rotary.types}

    def trunk(self, input_ids_BT, position_ids_BT=None, cache=None, masks: MaskCache | None = None,
              packed: bool | None = None):
        """Embedding and decoder layers -> hidden [B, T, D] before the final norm, router outputs."""
        B, T = input_ids_BT.shape
        x_BTD = self.model.embed_tokens(input_ids_BT)
        dtype = torch.get_autocast_dtype(x_BTD.device.type) if torch.is_autocast_enabled(x_BTD.device.type) \
            else x_BTD.dtype
        pos_BT = position_ids_BT if position_ids_BT is not None else \
            torch.arange(T, device=x_BTD.device).expand(B, T)
        rope = self.rope(pos_BT, dtype)
        if cache is None and masks is None:
            masks = MaskCache(self.cfg, T, packed_doc_ids(position_ids_BT, packed), x_BTD.device)
        routers = []
        for layer in self.model.layers:
            cos, sin = rope[layer.layer_type]
            plan = None if cache is not None else masks.get(layer.layer_type)
            x_BTD, r = layer(x_BTD, cos, sin, plan, cache)
            if r is not None:
                routers.append(r)
        return x_BTD, routers

    def head(self, h_BTD):
        """Final norm and LM head; logits in fp32."""
        return self.lm_head(self.model.norm(h_BTD)).float()

    # ------------------------------------------------------------------ forward + losses
    def forward(self, input_ids, labels=None, position_ids=None, mtp: bool | None = None,
                return_logits: bool = True, packed: bool | None = None) -> Output:
        """Logits (fp32) and, given labels, the losses. `return_logits=False` (training) computes the
        CE without materialising the logits (head_loss.linear_ce); Output.logits/mtp_logits are None.
        `packed`: whether any row of position_ids starts a second document (None: find out, which
        is a host sync on a GPU; the trainer knows from the host copy of the batch)."""
        if not return_logits and labels is None:
            raise ValueError("forward(return_logits=False) needs labels: without logits there is only the loss")
        h_BTD, routers = self.trunk(input_ids, position_ids, packed=packed)
        out = Output(logits=self.head(h_BTD) if return_logits else None, hidden=h_BTD, routers=routers)
        want_mtp = (labels is not None) if mtp is None else mtp
        hm_BTD = None
        if self.mtp is not None and want_mtp and input_ids.shape[1] > 1:
            hm_BTD, mtp_routers = self.mtp(self, h_BTD[:, :-1], input_ids[:, 1:],
                                           None if position_ids is None else position_ids[:, :-1], packed=packed)
            if return_logits:
                out.mtp_logits = self.mtp.logits(self, hm_BTD)
            out.routers = routers + mtp_routers
        if labels is not None:
            self._losses(out, labels, h_BTD, hm_BTD)
        return out

    def _ce(self, logits, norm, h_BTD, labels_BT, shift: int):
        if logits is not None:
            return self.ce(logits, labels_BT, shift)
        return linear_ce(norm(h_BTD), self.lm_head.weight, labels_BT, shift)

    def _losses(self, out: Output, labels_BT: torch.Tensor, h_BTD, hm_BTD) -> None:
        ce, n = self._ce(out.logits, self.model.norm, h_BTD, labels_BT, 1)
        losses = {"ce": ce}
        if hm_BTD is not None:
            losses["mtp"], _ = self._ce(out.mtp_logits, self.mtp.norm, hm_BTD, labels_BT, 2)
        losses.update(router_losses(out.routers, self.cfg.num_experts, self.count_reducer))
        out.loss, out.losses, out.n_tokens = objective(losses, loss_weights(self.cfg)), losses, n

    # ------------------------------------------------------------------ accounting
    def num_params(self, part: str = "trunk") -> int:
        """Parameter count of `part`: 'trunk' (the released model), 'mtp' (the MTP head only; it
        shares the embedding and LM head) or 'all'."""
        return sum(p.numel() for name, p in self.named_parameters() if _in_part(name, part))

    def num_active_params(self, part: str = "trunk") -> int:
        """Parameters touched per token: experts count K/E of their size; the embedding table is
        counted whole (the usual convention, which gives Mellum 2's 'about 2.44B active')."""
        k, e = self.cfg.num_experts_per_tok, self.cfg.num_experts
        total = 0
        for name, p in self.named_parameters():
            if _in_part(name, part):
                total += p.numel() * k // e if ".experts." in name else p.numel()
        return total

    def save_pretrained(self, path, max_shard_bytes: int | None = None, dtype=None) -> None:
        hf.save_pretrained(self, path, max_shard_bytes=max_shard_bytes, dtype=dtype)


def _in_part(name: str, part: str) -> bool:
    if part == "all":
        return True
    is_mtp = name.startswith("mtp.")
    if part == "mtp":
        return is_mtp
    if part == "trunk":
        return not is_mtp
    raise ValueError(f"part must be 'trunk', 'mtp' or 'all', got {part!r}")


@torch.no_grad()
def init_weights(model: Mellum2) -> None:
    """The one initialisation of every tensor (GPT-2/OLMo style, std = cfg.initializer_range = s):
    - embedding, q/k/v, dense gate/up, expert gate/up, MTP fc, LM head: N(0, s^2)
    - router: N(0, s^2) (near-uniform routing at start)
    - output projections (attention o_proj, dense and expert down_proj): N(0, (s / sqrt(2 L))^2),
      L = decoder layers incl. MTP, so the residual stream's variance does not grow with depth
    - RMSNorm weights: 1; rotary tables recomputed."""
    cfg = model.cfg
    s = cfg.initializer_range
    s_out = s / math.sqrt(2 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    for name, m in model.named_modules():
        if isinstance(m, RMSNorm):
            m.weight.fill_(1.0)
        elif isinstance(m, Experts):
            m.gate_proj.normal_(0.0, s)
            m.up_proj.normal_(0.0, s)
            m.down_proj.normal_(0.0, s_out)
        elif isinstance(m, (nn.Linear, nn.Embedding, Router)):
            is_out = name.endswith("o_proj") or name.endswith("down_proj")
            m.weight.normal_(0.0, s_out if is_out else s)
    model.rotary.reset()


def load_pretrained(path, dtype=None, device="cpu", mtp: bool = True, cfg: ModelConfig | None = None) -> Mellum2:
    """Load a Mellum checkpoint directory. dtype: torch dtype or name; default the checkpoint's
    `dtype` (float32 if absent). `mtp=False` ignores MTP weights and builds no head. `cfg`: build the
    model for this config instead of the checkpoint's (same tensors, e.g. its context extended with
    `cfg.extend_context`); the weights are loaded once, straight into that model."""
    path = Path(path)
    cfg = cfg or ModelConfig.from_hf(path)
    if isinstance(dtype, str):
        if dtype not in hf.DTYPES:
            raise ConfigError(f"dtype {dtype!r} not one of {list(hf.DTYPES)}")
        dtype = hf.DTYPES[dtype]
    dtype = dtype or hf.DTYPES.get(cfg.extra.get("dtype"), torch.float32)
    if not mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    hf.weight_files(path)  # a missing or truncated file fails before anything is allocated
    check_memory(cfg, torch.empty((), dtype=dtype).element_size(), device, where=str(path / "config.json"))
    with torch.device("meta"):
        model = Mellum2(cfg)
    model = model.to(dtype).to_empty(device=device)
    hf.load_weights(model, path, mtp=mtp)
    return model.eval()
