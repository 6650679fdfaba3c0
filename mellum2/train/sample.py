"""Greedy completions of a few code prompts at the end of training: a plain recompute-everything
loop (no KV cache), enough to see what a tiny model learnt. The inference engine (mellum2/infer)
is the real decoder; this stays deliberately simple so it cannot disagree with the model."""
from __future__ import annotations

import contextlib

import torch

PROMPTS = (
    "def fibonacci(n):\n",
    "import numpy as np\n\ndef mean_squared_error(y_true, y_pred):\n",
    "for i in range(",
    "class Stack:\n    def __init__(self):\n",
)


@torch.no_grad()
def greedy(model, ids: list[int], max_new_tokens: int, stop_ids=(), device="cpu", bf16: bool = True) -> list[int]:
    """Append argmax tokens to `ids` until a stop id or `max_new_tokens` (context clipped to the
    model's max_position_embeddings). Every rank must call it under FSDP (forward is collective)."""
    was_training = model.training
    model.eval()
    ctx = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    out = list(ids)
    limit = model.cfg.max_position_embeddings
    try:
        for _ in range(max_new_tokens):
            x = torch.tensor([out[-limit:]], device=device)
            with ctx:  # the full forward (not trunk/head): FSDP gathers parameters in forward hooks
                nxt = int(model(x, mtp=False).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stop_ids:
                break
    finally:
        model.train(was_training)
    return out[len(ids):]


def completions(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = 48, device="cpu", bf16=True) -> list[tuple[str, str]]:
    stop = {tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "eot_id", tokenizer.bos_id)}
    res = []
    for p in prompts:
        ids = [tokenizer.bos_id] + tokenizer.encode(p)
        new = greedy(model, ids, max_new_tokens, stop, device, bf16)
        res.append((p, tokenizer.decode([t for t in new if t not in stop])))
    return res
