"""`mellum2 <stage> ...`: a thin dispatcher to each stage module's `main(argv)`.

Stage modules are imported lazily so `mellum2 info` does not pay for the data pipeline's imports.
"""
from __future__ import annotations

import importlib
import sys

from mellum2.allocator import keep_freed_memory
from mellum2.errors import run_stage

# stage -> (module, one-line help). Each module defines main(argv: list[str]) -> int | None.
STAGES: dict[str, tuple[str, str]] = {
    "info": ("mellum2.model.info", "parameter, FLOP and KV-cache accounting of a preset or checkpoint"),
    "demo": ("mellum2.demo", "the end-to-end demo run by `make demo`"),
    "tokenizer": ("mellum2.tokenizer.cli", "train / inspect the byte-level BPE tokenizer"),
    "data": ("mellum2.data.cli", "prepare the pre-training corpus (filters, dedup, FIM, packing)"),
    "train": ("mellum2.train.pretrain", "pre-train (and long-context stage) with Muon, WHD schedule, MTP"),
    "sft": ("mellum2.posttrain.sft", "supervised fine-tuning into the Instruct or Thinking variant"),
    "train-mtp": ("mellum2.train.mtp_head", "train an MTP draft head for a frozen checkpoint"),
    "plan": ("mellum2.train.plan", "memory per GPU and step time / tokens per day of a training layout"),
    "generate": ("mellum2.infer.cli", "generate text (optionally MTP-speculative)"),
    "complete": ("mellum2.infer.cli", "fill-in-the-middle completion"),
    "eval": ("mellum2.eval.cli", "evaluations (humaneval, infill, completion, bpb, mtp, chat, rl, passkey, lm-eval, ...)"),
    "speedrun": ("mellum2.eval.speedrun", "the whole recipe end to end, every eval, runs/speedrun/report.md"),
    "chat": ("mellum2.chat.cli", "chat with an Instruct/Thinking checkpoint (reasoning, tool calls, MTP)"),
    "serve": ("mellum2.serve.cli", "OpenAI-compatible HTTP server (completions, chat, tools, web chat page)"),
    "rl": ("mellum2.posttrain.rl", "RL with verifiable rewards (Mellum 2's GRPO variant) from an SFT run"),
}


def usage() -> str:
    lines = ["usage: mellum2 <stage> [options]", "", "stages:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in STAGES.items()]
    lines += ["", "`mellum2 <stage> --help` for a stage's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"mellum2: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    keep_freed_memory()  # see mellum2/allocator.py: no page-fault storm per training step
    module = importlib.import_module(STAGES[stage][0])
    if stage in ("generate", "complete"):
        rest = [stage, *rest]
    return run_stage(stage, module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
