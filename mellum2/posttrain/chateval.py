"""Evaluate a chat model on the held-out SFT prompts: greedy replies through the inference engine,
parsed with the chat parser, scored with `sfteval.check_reply`.

    from mellum2.posttrain.chateval import evaluate
    r = evaluate("runs/sft-instruct")                     # or a Mellum2 model + tokenizer
    r["well_formed"], r["tool_name"], r["identity"], r["think_ok"], r["by_kind"]

    python -m mellum2.posttrain.chateval --model runs/sft-thinking --think [--n 200] [--code]

What is measured (the issue's acceptance criteria, docs/posttrain.md):
- well_formed: the reply ends with `<|im_end|>` (generation stopped there, not at the token budget or on
  another stop token) and `mellum2.chat.parse` reports no errors;
- tool_name: of the prompts that expect tool calls, the share whose reply has a parseable call and
  exactly the expected tool names (`tool_ok`: the arguments match too);
- identity: of the identity prompts, the share naming the model ("Mellum");
- think_ok (`think=True`): the reply opens with `<think>` and closes it before a non-empty answer
  (content or a tool call);
- by_kind: check_reply's pass rate per kind (tool, clarify, no_tool, identity, math, json; code only with
  `code=True`, run by the sandboxed verifier: mellum2.posttrain.verify.score).

Prompts are rendered with `add_generation_prompt=True` and thinking on (the template then adds no think
span, which is what both variants were trained on). Replies are greedy, batched by prompt length, capped
at `max_new_tokens` and by the model's context. Everything here imports no CLI; `main` is the command line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from mellum2 import atomic
from mellum2.chat import parse, render
from mellum2.errors import run_stage
from mellum2.infer.engine import Engine
from mellum2.infer.sampling import SamplingParams
from mellum2.locate import resolve_model_dir, tokenizer_dir
from mellum2.model import Mellum2, load_pretrained
from mellum2.tokenizer import Tokenizer

from .sfteval import check_reply, sft_eval_prompts

END = "<|im_end|>"


def think_ok(text: str, msg: dict) -> bool:
    """The reply opens a think span, closes it, and then answers (content or a tool call)."""
    body = text.lstrip()
    if not body.startswith("<think>") or "</think>" not in body:
        return False
    return bool((msg.get("content") or "").strip() or msg.get("tool_calls"))


def _code_ok(item: dict, msg: dict) -> bool | None:
    from .verify import score  # the sandboxed verifier: only when code is scored

    try:
        reward, _ = score({"kind": "code", **item["expect"]}, msg)
    except Exception:  # noqa: BLE001 - no sandbox here: leave code unscored
        return None
    return reward >= 1.0


def generate_replies(model: Mellum2, tokenizer: Tokenizer, items: list[dict], *, think: bool = True,
                     max_new_tokens: int = 384, batch_size: int = 16) -> list[tuple[str, str | None]]:
    """(decoded reply, finish) per item, greedy; the reply includes the stop token that ended it."""
    engine = Engine(model)
    ctx = model.cfg.max_position_embeddings
    stops = tuple(sorted({tokenizer.eos_id, tokenizer.eot_id, tokenizer.im_start_id}))
    prompts = [tokenizer.encode(render(it["messages"], it.get("tools"), add_generation_prompt=True,
                                       enable_thinking=think)) for it in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    out: list[tuple[str, str | None]] = [("", None)] * len(items)
    V = tokenizer.vocab_size
    for s in range(0, len(order), batch_size):
        idx = [i for i in order[s:s + batch_size] if len(prompts[i]) < ctx]
        for i in order[s:s + batch_size]:
            if len(prompts[i]) >= ctx:
                out[i] = ("", "prompt longer than the context")
        if not idx:
            continue
        room = ctx - max(len(prompts[i]) for i in idx)
        params = SamplingParams(max_new_tokens=min(max_new_tokens, room), temperature=0.0, stop_token_ids=stops)
        with torch.inference_mode():
            res = engine.generate([prompts[i] for i in idx], params)
        for i, r in zip(idx, res):
            out[i] = (tokenizer.decode([t for t in r.tokens if t < V]), r.finish_reason)
    return out


def evaluate(model, tokenizer: Tokenizer | None = None, *, think: bool = False, n: int | None = None,
             items: list[dict] | None = None, max_new_tokens: int | None = None, batch_size: int = 16,
             code: bool = False, keep_replies: bool = False) -> dict:
    """Scores of `model` (a directory or a Mellum2) on the held-out prompts (see the module docstring).
    `think`: also score the Thinking format (think_ok). Rates are fractions in [0, 1]."""
    if not isinstance(model, Mellum2):
        mdir = resolve_model_dir(model, "model")
        tokenizer = tokenizer or Tokenizer.load(tokenizer_dir(mdir))
        model = load_pretrained(mdir, dtype=torch.float32)
    elif tokenizer is None:
        raise ValueError("evaluate: pass the tokenizer with a model object")
    items = items if items is not None else sft_eval_prompts(n)
    t0 = time.perf_counter()
    replies = generate_replies(model, tokenizer, items, think=True, batch_size=batch_size,
                               max_new_tokens=max_new_tokens or (768 if think else 384))
    per_kind: dict[str, list] = defaultdict(list)
    wf, tool_name, tool_ok, ident, thinks, rows = [], [], [], [], [], []
    for it, (text, finish) in zip(items, replies):
        msg = parse(text)
        well = text.endswith(END) and not msg["errors"]
        wf.append(well)
        chk = check_reply(it, msg)
        ok = chk["ok"]
        if it["kind"] == "code" and code:
            ok = _code_ok(it, msg)
        if ok is not None:
            per_kind[it["kind"]].append(bool(ok))
        if it["kind"] == "tool":
            tool_name.append(bool(msg["tool_calls"]) and not msg["errors"] and bool(chk.get("tool_name")))
            tool_ok.append(bool(ok))
        if it["kind"] == "identity":
            ident.append(bool(ok))
        if think:
            thinks.append(think_ok(text, msg))
        if keep_replies:
            rows.append({"id": it["id"], "kind": it["kind"], "reply": text, "finish": finish, "well_formed": well,
                         "ok": ok, "reason": chk["reason"]})

    def rate(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    result = {"prompts": len(items), "well_formed": rate(wf), "tool_name": rate(tool_name), "tool_ok": rate(tool_ok),
              "identity": rate(ident), "think_ok": rate(thinks) if think else None,
              "by_kind": {k: rate(v) for k, v in sorted(per_kind.items())},
              "counts": {k: len(v) for k, v in sorted(per_kind.items())},
              "seconds": round(time.perf_counter() - t0, 1)}
    if keep_replies:
        result["replies"] = rows
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mellum2.posttrain.chateval",
                                description="score a chat model on the held-out SFT prompts (greedy)")
    p.add_argument("--model", required=True, help="checkpoint directory or run directory")
    p.add_argument("--think", action="store_true", help="also require <think> ... </think> before the answer")
    p.add_argument("--n", type=int, default=None, help="prompts (default: all 200)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 384, 768 with --think")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--code", action="store_true", help="also run the code prompts' tests (sandbox)")
    p.add_argument("--replies", default=None, metavar="FILE", help="write every reply and its score (JSONL)")
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = evaluate(a.model, think=a.think, n=a.n, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                 code=a.code, keep_replies=a.replies is not None)
    if a.replies:
        atomic.write_text(Path(a.replies), "".join(json.dumps(x) + "\n" for x in r.pop("replies")))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("chateval", main))
