"""Decoding speed, ours vs transformers' `MellumForCausalLM.generate`, on the same weights in one run.

    .venv/bin/python benchmarks/decode.py --model runs/tiny            # a trained tiny (run or checkpoint dir)
    .venv/bin/python benchmarks/decode.py                              # random tiny weights (no speculation figure)

Measured, for fp32 and bf16 (parameters in that dtype, no autocast, for both engines):
  - greedy tokens/s at batch 1 and batch 8, end to end (prefill included, as `generate` reports it),
    ours and transformers', with their ratio; ours also decode-only (stats.tokens_per_s);
  - the same with Engine(compile=True) (the decode step compiled, C++ wrapper; compile time reported,
    not counted);
  - prefill tokens/s (one forward over a 512-token prompt into the cache), ours and transformers';
  - MTP speculative vs our plain greedy at batch 1 (eager; and compiled against the compiled plain
    step) on held-out code (Python files of site-packages, which the embedded corpus excludes; the
    prompt is the code before a cut, the model continues it), k = 1..3 drafts: tokens/s (end to
    end; the ratio also decode only), acceptance, mean accepted length, and whether the output equals
    plain greedy token for token. Needs a checkpoint with an MTP head (trained: acceptance means
    nothing on random weights).
Every figure is the best of --repeats interleaved runs (the machine is shared; best-of is the least
noisy estimate of what the code can do), timed by this process's CPU time when single-threaded
(`--clock cpu`, the default with --threads 1: time spent descheduled by other jobs is not counted)
or by the wall clock; "decode only" is the engine's own wall-clock figure. The last stdout line is
one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mellum2.allocator import keep_freed_memory  # noqa: E402
from mellum2 import Mellum2, ModelConfig, load_pretrained  # noqa: E402
from mellum2.errors import MellumError  # noqa: E402
from mellum2.infer.cli import load_draft_vocab, resolve_tokenizer  # noqa: E402
from mellum2.locate import resolve_model_dir  # noqa: E402
from mellum2.infer.engine import Engine  # noqa: E402
from mellum2.infer.sampling import SamplingParams  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLOCK = [time.perf_counter]  # or time.process_time (--clock cpu), set in main


def best(fn, repeats):
    out = None
    for _ in range(repeats):
        r = fn()
        out = r if out is None or r["tok_s"] > out["tok_s"] else out
    return out


def ours_generate(eng, prompts, n, **kw):
    t0 = CLOCK[0]()
    res = eng.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True), **kw)
    wall = CLOCK[0]() - t0
    s = res[0].stats
    return {"tok_s": len(prompts) * n / wall, "decode_tok_s": s.tokens_per_s, "tokens": [r.tokens for r in res],
            "acceptance": s.acceptance, "mean_accepted_length": s.mean_accepted_length}


def hf_generate(hf, prompts, n):
    x = torch.tensor(prompts)
    with torch.no_grad():
        t0 = CLOCK[0]()
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        wall = CLOCK[0]() - t0
    return {"tok_s": len(prompts) * n / wall, "tokens": out[:, x.shape[1]:].tolist()}


def ours_prefill(eng, prompt):
    from mellum2.infer.kvcache import KVCache

    cache = KVCache(eng.cfg, 1, len(prompt) + 1, eng.dtype)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t0 = CLOCK[0]()
        eng.fwd.head(eng.fwd.trunk(ids, torch.arange(len(prompt))[None], cache)[:, -1:])
        return {"tok_s": len(prompt) / (CLOCK[0]() - t0)}


def hf_prefill(hf, prompt):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t0 = CLOCK[0]()
        hf(ids, use_cache=True, logits_to_keep=1)
        return {"tok_s": len(prompt) / (CLOCK[0]() - t0)}


def agreement(a, b):
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(len(r) for r in a))


def main(argv=None):
    keep_freed_memory()  # mellum2/allocator.py; process-wide, so both sides of the comparison get it
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint or run directory (default: random tiny weights)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    p.add_argument("--spec-prompts", type=int, default=8, help="held-out code prompts for speculation")
    p.add_argument("--draft-tokens", default="1,2,3")
    p.add_argument("--draft-vocab", type=int, default=1024,
                   help="draft from the N most frequent ids (the checkpoint's draft_vocab.json if it has one, "
                        "else counted on the default data); 0: the full vocabulary")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip the Engine(compile=True) rows")
    p.add_argument("--clock", choices=("wall", "cpu"), default=None,
                   help="wall time, or this process's CPU time (single-threaded runs on a shared machine: time "
                        "spent descheduled is not counted); default: cpu with --threads 1, else wall")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if torch.get_num_threads() == 1 else "wall")
    CLOCK[0] = time.process_time if clock == "cpu" else time.perf_counter
    import transformers

    transformers.logging.set_verbosity_error()
    if args.model:
        try:
            mdir = resolve_model_dir(args.model, "--model")
        except MellumError as e:
            p.error(str(e))
    else:
        mdir = Path(tempfile.mkdtemp(prefix="mellum2-bench-")) / "tiny"
        torch.manual_seed(0)
        Mellum2(ModelConfig.from_preset("tiny")).save_pretrained(mdir)
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig.from_hf(mdir)
    prompts8 = torch.randint(100, cfg.vocab_size, (8, args.prompt_len), generator=g).tolist()
    long_prompt = torch.randint(100, cfg.vocab_size, (args.prefill_len,), generator=g).tolist()
    spec_prompts = None
    try:
        from mellum2.train.mtp_head import heldout_code_prompts

        tok = resolve_tokenizer(None, mdir)
        code = heldout_code_prompts(tok, max(8, args.spec_prompts), args.prompt_len)
        prompts8, spec_prompts = code[:8], code[: args.spec_prompts]  # real code when we have a tokenizer
    except Exception as e:  # noqa: BLE001
        print(f"note: no tokenizer/held-out prompts ({e}); random prompts, no speculation figure")
    print(f"model {mdir}, threads {torch.get_num_threads()}, {clock} clock, {args.new_tokens} new tokens, prompts "
          f"of {args.prompt_len}, best of {args.repeats}, load average {os.getloadavg()[0]:.1f}")

    rows, res = [], {"model": str(mdir), "threads": torch.get_num_threads(), "clock": clock,
                     "new_tokens": args.new_tokens}
    for dname in args.dtypes.split(","):
        dt = DTYPES[dname]
        m = load_pretrained(mdir, dtype=dt)
        eng = Engine(m)
        hf = None if args.no_hf else transformers.MellumForCausalLM.from_pretrained(mdir, dtype=dt).eval()
        ours_generate(eng, prompts8[:1], 8)  # warm up
        if hf is not None:
            hf_generate(hf, prompts8[:1], 8)
        engc = Engine(m, compile=True) if not args.no_compile else None
        for B in (1, 8):
            pr = prompts8[:B]
            if engc is not None:
                t0 = time.perf_counter()
                ours_generate(engc, pr, 8)  # compiles the step for this batch size
                res[f"{dname}_b{B}_compile_s"] = round(time.perf_counter() - t0, 1)
            o = best(lambda: ours_generate(eng, pr, args.new_tokens), args.repeats)
            oc = best(lambda: ours_generate(engc, pr, args.new_tokens), args.repeats) if engc is not None else None
            h = best(lambda: hf_generate(hf, pr, args.new_tokens), args.repeats) if hf is not None else None
            for name, r in (("", o), (" compiled", oc)):
                if r is None:
                    continue
                key = f"{dname}_b{B}" + name.strip().replace("compiled", "_compiled")
                res[key] = {"ours": round(r["tok_s"], 1), "ours_decode": round(r["decode_tok_s"], 1)}
                line = (f"{dname:5s} greedy batch {B}{name:9s}: ours {r['tok_s']:7.1f} tok/s (decode only "
                        f"{r['decode_tok_s']:7.1f})")
                if h is not None:
                    res[key].update(hf=round(h["tok_s"], 1), ratio=round(r["tok_s"] / h["tok_s"], 2),
                                    agree=round(agreement(r["tokens"], h["tokens"]), 3))
                    line += (f"  transformers {h['tok_s']:7.1f} tok/s  ratio {r['tok_s'] / h['tok_s']:5.2f}x"
                             f"  same tokens {res[key]['agree']:.0%}")
                rows.append(line)
                print(line, flush=True)
        o = best(lambda: ours_prefill(eng, long_prompt), args.repeats)
        res[f"{dname}_prefill"] = {"ours": round(o["tok_s"], 1)}
        line = f"{dname:5s} prefill {len(long_prompt)} tokens: ours {o['tok_s']:8.0f} tok/s"
        if hf is not None:
            h = best(lambda: hf_prefill(hf, long_prompt), args.repeats)
            res[f"{dname}_prefill"].update(hf=round(h["tok_s"], 1), ratio=round(o["tok_s"] / h["tok_s"], 2))
            line += f"  transformers {h['tok_s']:8.0f} tok/s  ratio {o['tok_s'] / h['tok_s']:5.2f}x"
        rows.append(line)
        print(line, flush=True)
        if spec_prompts and m.mtp is not None:
            spec = {}
            vocab = load_draft_vocab(mdir) if args.draft_vocab else None
            if args.draft_vocab and vocab is None:
                from mellum2.data import ensure_default_data
                from mellum2.train.mtp_head import draft_vocab_from_data

                vocab = draft_vocab_from_data(ensure_default_data(progress=False), args.draft_vocab)
            trimmed = Engine(m, draft_vocab=vocab) if vocab is not None else eng
            ks = [(k, trimmed) for k in map(int, args.draft_tokens.split(","))]
            if vocab is not None:
                ks.append(("1-fullvocab", eng))
            res["draft_vocab"] = len(vocab) if vocab is not None else cfg.vocab_size
            # compiled: one engine (static cache, draft vocabulary) against its own compiled plain step
            modes = [(eng, ks)]
            if engc is not None:
                engc.set_draft_vocab(vocab)
                cks = [(f"{k}-compiled", engc) for k in map(int, args.draft_tokens.split(","))]
                # compile every step and bucket first; the largest k first, so that the static cache
                # built for it serves every later call (a new cache would mean new graphs)
                for k in sorted(map(int, args.draft_tokens.split(",")), reverse=True):
                    ours_generate(engc, [spec_prompts[0]], args.new_tokens, speculative=True, draft_tokens=k)
                ours_generate(engc, [spec_prompts[0]], args.new_tokens)
                modes.append((engc, cks))
            for i, sp in enumerate(spec_prompts):
                for plain_eng, kk_list in modes:
                    plain = best(lambda: ours_generate(plain_eng, [sp], args.new_tokens), args.repeats)
                    for k, e in kk_list:
                        kk = int(str(k).split("-")[0])
                        s = best(lambda: ours_generate(e, [sp], args.new_tokens, speculative=True, draft_tokens=kk),
                                 args.repeats)
                        d = spec.setdefault(k, {"plain_s": 0.0, "spec_s": 0.0, "plain_dec_s": 0.0, "spec_dec_s": 0.0,
                                                "acc": [], "len": [], "same": True})
                        d["plain_s"] += args.new_tokens / plain["tok_s"]
                        d["spec_s"] += args.new_tokens / s["tok_s"]
                        d["plain_dec_s"] += args.new_tokens / plain["decode_tok_s"]
                        d["spec_dec_s"] += args.new_tokens / s["decode_tok_s"]
                        d["acc"].append(s["acceptance"])
                        d["len"].append(s["mean_accepted_length"])
                        d["same"] &= s["tokens"] == plain["tokens"]
            for k, d in spec.items():
                n = len(spec_prompts) * args.new_tokens
                e = {"plain": round(n / d["plain_s"], 1), "spec": round(n / d["spec_s"], 1),
                     "speedup": round(d["plain_s"] / d["spec_s"], 2),
                     "speedup_decode_only": round(d["plain_dec_s"] / d["spec_dec_s"], 2),
                     "acceptance": round(sum(d["acc"]) / len(d["acc"]), 3),
                     "mean_accepted_length": round(sum(d["len"]) / len(d["len"]), 2), "identical": d["same"]}
                res[f"{dname}_spec_k{k}"] = e
                nv = res["draft_vocab"] if k != "1-fullvocab" else cfg.vocab_size
                mode = "compiled, vs compiled plain" if "compiled" in str(k) else "eager"
                line = (f"{dname:5s} MTP speculative k={str(k).split('-')[0]} ({mode}, draft vocab {nv}) on held-out "
                        f"code, batch 1: "
                        f"{e['spec']:7.1f} tok/s vs plain "
                        f"{e['plain']:7.1f} = {e['speedup']:.2f}x (decode only {e['speedup_decode_only']:.2f}x), "
                        f"acceptance {e['acceptance']:.2f}, "
                        f"{e['mean_accepted_length']:.2f} tokens/pass, identical to greedy: {e['identical']}")
                rows.append(line)
                print(line, flush=True)
        del m, eng, hf
    res["load_average"] = round(os.getloadavg()[0], 1)
    print("\n".join(["", "summary:"] + rows))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
