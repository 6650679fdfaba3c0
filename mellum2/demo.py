"""`make demo` / `mellum2 demo`: the end-to-end tour on this machine's CPU.

Steps (each a call into the stage's own module, nothing demo-specific hidden here):
  1. the `tiny` model: its accounting next to the released 12B's, and a forward pass;
  2. the embedded corpus (Python's standard library, its docs, generated math), prepared once and cached;
  3. pre-training `tiny` with its MTP head over the three-phase curriculum (`mellum2 train`; README.md says
     how long the demo takes);
  4. code completion with the trained model: left to right (to the end of the function) and
     fill-in-the-middle, plain greedy and MTP self-speculative through the compiled engine (identical
     output; whether each filled-in function parses, the acceptance and the speed-up printed).
Re-running continues where it stopped: a finished training run is reused, an interrupted one resumed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .data import ensure_default_data
from .infer import demo_completion
from .model import Mellum2, ModelConfig
from .model.info import print_report, report
from .tokenizer import Tokenizer
from .train import checkpoint as ckpt
from .train import pretrain


def step_model() -> None:
    print("== 1. the model ==")
    for name in ("mellum2-12b", "tiny"):
        cfg = ModelConfig.from_preset(name)
        print_report(name, cfg, report(cfg))
        print()
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = Mellum2(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 512))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
        t = time.perf_counter()
        out = model(ids, labels=ids)
        dt = time.perf_counter() - t
    print(f"tiny forward, batch 8 x 512 (bf16 autocast): {dt:.3f} s, {8 * 512 / dt:,.0f} tok/s; "
          f"loss at init {out.loss.item():.3f} (ln V = {torch.tensor(cfg.vocab_size).log().item():.3f}); "
          + ", ".join(f"{k} {v.item():.3f}" for k, v in out.losses.items()))


def step_data() -> Path:
    print("\n== 2. the embedded corpus ==")
    d = ensure_default_data(progress=True)
    print(f"prepared data: {d}")
    return d


def step_train(out: Path) -> Path:
    print("\n== 3. pre-training tiny (three-phase curriculum, Muon, WHD schedule, MTP) ==")
    args = pretrain.DEMO_ARGS + ["--out", str(out)]
    total = int(args[args.index("--max-steps") + 1])
    done = ckpt.list_checkpoints(out)
    if done and done[-1][0] >= total:
        print(f"{out}: already trained ({total} steps); delete it to train again")
        return out
    return pretrain.run(args + (["--resume"] if done else []))


def step_complete(run_dir: Path) -> dict:
    print("\n== 4. completion with the trained model (plain greedy vs MTP self-speculative, compiled engine) ==")
    # compiled: the decode steps' one-off compile (printed, not counted in the speed ratio) pays off in
    # any use past the demo, and the eager step's Python overhead would hide what speculation saves
    return demo_completion(run_dir, Tokenizer.load(run_dir / "tokenizer"), compile=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mellum2 demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="training run directory")
    ap.add_argument("--quick", action="store_true", help="only step 1 (model accounting and a forward pass)")
    a = ap.parse_args(argv)
    t0 = time.time()
    step_model()
    if a.quick:
        return 0
    step_data()
    out = step_train(Path(a.out))
    step_complete(out)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; the run is in {out} (loss.png, metrics.jsonl, samples.txt); "
          f"next: `mellum2 generate --model {out} --prompt 'def '`, docs/train.md, docs/inference.md")
    return 0
