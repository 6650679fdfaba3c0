"""mellum2.train: pre-training (Muon + AdamW, Warmup-Hold-Decay, FP8 hybrid, MTP, exact resume, FSDP2).

Entry points: `mellum2 train` (pretrain.main), `pretrain.run(argv) -> out_dir` for the demo, and the
pieces for later stages: `Trainer`, `Muon`, `WarmupHoldDecay`, `parallelize`. See docs/train.md.
"""
from .muon import Muon
from .schedule import WarmupHoldDecay

__all__ = ["Muon", "WarmupHoldDecay"]
