"""`make demo` / `mellum2 demo`: the end-to-end tour on this machine's CPU.

Steps (each a call into the stage's own module, nothing demo-specific hidden here):
  1. the `tiny` model: its accounting next to the released 12B's, and a forward pass;
  2. the embedded corpus (Python's standard library, its docs, generated math), prepared once and cached;
  3. pre-training `tiny` with its MTP head over the three-phase curriculum (`mellum2 train`; README.md says
     how long the demo takes);
  4. code completion with the trained model: left to right (to the end of the function) and
     fill-in-the-middle, plain greedy and MTP self-speculative through the compiled engine (identical
     output; whether each filled-in function parses, the acceptance and the speed-up printed);
  5. a short SFT of that model into the Instruct variant on the embedded chat data (`mellum2 sft`);
  6. one chat turn and one tool call with it (the terminal chat's code, greedy, the tool run locally).
Re-running continues where it stopped: a finished training run is reused, an interrupted one resumed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .data import ensure_default_data
from .infer import demo_completion
from .chat.cli import Chat
from .infer import Engine, SamplingParams
from .model import Mellum2, ModelConfig, load_pretrained
from .model.info import print_report, report
from .posttrain import sft
from .posttrain.tools import TOOLS, run_tool
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


def step_sft(base: Path, out: Path) -> Path:
    print("\n== 5. supervised fine-tuning into the Instruct variant (embedded chat data, MTP on) ==")
    if (out / "config.json").is_file():
        print(f"{out}: already fine-tuned; delete it to fine-tune again")
        return out
    resume = ["--resume"] if ckpt.list_checkpoints(out) else []
    return sft.run(sft.DEMO_ARGS + ["--from", str(base), "--out", str(out), *resume])


def step_chat(model_dir: Path) -> dict:
    """One chat turn and one tool call (the calculator, run here), greedy, through `mellum2 chat`'s Chat."""
    print("\n== 6. chatting with the Instruct model (greedy) ==")
    tok = Tokenizer.load(model_dir)
    model = load_pretrained(model_dir, dtype=torch.float32)
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=200, temperature=0.0)
    chat = Chat(engine, tok, params, model.cfg.max_position_embeddings, speculative=model.mtp is not None, color=False)
    print("> Who are you?")
    first = chat.say("Who are you?")
    chat = Chat(engine, tok, params, model.cfg.max_position_embeddings, system="You are a helpful assistant with "
                "access to tools.", tools=[TOOLS["calculator"]], speculative=model.mtp is not None, color=False)
    print("\n> What is 37 * 43? Use the calculator.")
    msg = chat.say("What is 37 * 43? Use the calculator.")
    calls = (msg or {}).get("tool_calls") or []
    for c in calls:
        result = run_tool(c["function"]["name"], json.loads(c["function"]["arguments"]))
        print(f"[tool response] {result}")
        chat.command(f"/tool {result}")  # after the last call's answer the model goes on
    if not calls:
        print("(no tool call this time: the model answered directly)")
    return {"identity": (first or {}).get("content"), "tool_calls": calls}


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
    chat_dir = step_sft(out, Path(f"{a.out}-sft"))
    step_chat(chat_dir)
    print(f"\ndemo finished in {time.time() - t0:.0f} s; the run is in {out} (loss.png, metrics.jsonl, samples.txt), "
          f"the Instruct model in {chat_dir}; next: `mellum2 generate --model {out} --prompt 'def '`, "
          f"`mellum2 chat --model {chat_dir}`, docs/train.md, docs/inference.md, docs/posttrain.md")
    return 0
