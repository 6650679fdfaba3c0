"""lm-evaluation-harness model class `mellum2`: loglikelihood, loglikelihood_rolling and generate_until
on our model and engine, batched.

    lm_eval --model mellum2 --model_args pretrained=runs/demo --tasks TASK [--include_path DIR]
    mellum2 eval lm-eval --model_args pretrained=runs/demo --tasks TASK      (the same, no hook needed)

lm_eval 0.4.13 finds models only in its own registry (it reads no entry points), so `lm_eval --model
mellum2` needs this module registered first: `mellum2 eval lm-eval` imports it and hands the
arguments to lm_eval's own CLI; `make` also installs the import hook of lmeval_hook.py, which
registers this class lazily in every interpreter that imports lm_eval.

What each request computes (as lm_eval's HF model does):
  loglikelihood(context, continuation): the summed log-probability of the continuation's tokens after
    `<|endoftext|>` + context, and whether each was the argmax. Trailing spaces of the context move to
    the continuation (the tokenizer attaches a space to the next word); the continuation's tokens are
    those of encode(context + continuation) after encode(context). Too long: the oldest tokens go.
    Requests are sorted by length and padded on the right (a causal model: pads after the real
    tokens change nothing before them).
  loglikelihood_rolling(text): the whole text's log-probability after `<|endoftext|>`, in sliding
    windows of the model's context (bpb.model_bits).
  generate_until(context, {until, max_gen_toks, do_sample, temperature}): the engine's completion,
    cut at the first stop string.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM  # this module exists for lm_eval: a hard import here
from lm_eval.api.registry import register_model

from mellum2.infer.api import make_params
from mellum2.infer.engine import Engine

from . import bpb
from .common import load, progress


@register_model("mellum2")
class Mellum2LM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, batch_size=8, max_length: int | None = None,
                 dtype: str = "float32", device: str = "cpu", max_gen_toks: int = 256, **kwargs):
        super().__init__()
        self.model, self.tok = load(pretrained, tokenizer, dtype)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm_eval's default device is cuda; run where we can
        if device and device != "cpu":
            self.model.to(device)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_length = int(max_length or self.model.cfg.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.engine = Engine(self.model)

    # ------------------------------------------------------------------ helpers
    def _enc(self, text: str) -> list[int]:
        return list(self.tok.encode(text, allow_special=False))

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n = len(context) - len(context.rstrip(" "))
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self._enc(context + continuation), self._enc(context)
        if whole[:len(ctx)] != ctx:  # the boundary merged into one token: fall back to separate encodings
            return [self.tok.bos_id] + ctx, self._enc(continuation)
        return [self.tok.bos_id] + ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p, all greedy) of each continuation after its context, batched by length."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list = [None] * len(pairs)
        dev = self.model.lm_head.weight.device
        for a in progress(range(0, len(order), self.batch_size), "loglikelihood"):
            idx = order[a:a + self.batch_size]
            seqs, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                ids = (ctx + cont)[-(self.max_length + 1):]
                seqs.append(ids[:-1])
                conts.append(cont[-len(ids) + 1:] if len(cont) >= len(ids) else cont)
            T = max(map(len, seqs))
            x = torch.tensor([s + [s[-1]] * (T - len(s)) for s in seqs], device=dev)
            h, _ = self.model.trunk(x)
            for b, i in enumerate(idx):
                n, L = len(conts[b]), len(seqs[b])
                logp = F.log_softmax(self.model.head(h[b:b + 1, L - n:L]).float()[0], -1)
                tgt = torch.tensor(conts[b], device=dev)
                out[i] = (logp.gather(-1, tgt[:, None]).sum().item(), bool((logp.argmax(-1) == tgt).all()))
        return out

    # ------------------------------------------------------------------ the LM interface
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([self._split(*r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in progress(requests, "loglikelihood_rolling", quiet=disable_tqdm):
            ids = [self.tok.bos_id] + self._enc(r.args[0])
            out.append(-bpb.model_bits(self.model, ids, self.max_length) * math.log(2))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        stops = [t for t in (self.tok.eot_id, self.tok.eos_id) if t is not None]
        prompts, params, untils = [], [], []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            ids = ([self.tok.bos_id] + self._enc(context))[-(self.max_length - n):]
            prompts.append(ids)
            params.append(make_params(n, temp, top_p=kw.get("top_p"), seed=0 if temp > 0 else None,
                                      stop=[*stops, *until]))
            untils.append(until)
        out = []
        for a in progress(range(0, len(prompts), self.batch_size), "generate_until", quiet=disable_tqdm):
            res = self.engine.generate(prompts[a:a + self.batch_size], params[a:a + self.batch_size],
                                       detokenize=self.tok.decode)
            for r, until in zip(res, untils[a:a + self.batch_size]):
                text = self.tok.decode([t for t in r.tokens if t not in stops])
                cut = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=len(text))
                out.append(text[:cut])
        return out


def main(argv: list[str]) -> int:
    """`mellum2 eval lm-eval ARGS`: lm_eval's own CLI (`lm_eval --model mellum2 ARGS`) with this class
    registered; `--model mellum2` is added when no --model is given."""
    import sys

    from lm_eval.__main__ import cli_evaluate  # lm_eval's CLI, unchanged

    argv = list(argv)
    if "--model" not in argv:
        argv = ["--model", "mellum2", *argv]
    if argv and argv[0] not in ("run", "ls", "validate"):
        argv = ["run", *argv]
    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0
