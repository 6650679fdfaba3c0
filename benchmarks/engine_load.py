"""Throughput of the engine's continuous batching against serving one request at a time and static
batching, on the same requests in one run; and time to first token with and without the prefix
cache on an IDE-like workload (one file, a little longer at every request).

    .venv/bin/python benchmarks/engine_load.py                       # random `tiny` weights
    .venv/bin/python benchmarks/engine_load.py --config test-small2  # a preset
    .venv/bin/python benchmarks/engine_load.py --model runs/tiny     # a checkpoint or run directory

Mixed load: --requests requests, prompts of 16..--max-prompt tokens and outputs of 8..--max-new
tokens (fixed seed), greedy, all queued at once:
  - continuous: one Engine(max_num_seqs=--slots): rows join and leave at every step;
  - one at a time: each request alone (`generate([prompt])`), one after the other;
  - static: --slots requests at a time, the next batch only when the whole batch is done.
Every mode's outputs must equal one at a time's (greedy): "equal" in the JSON.
File workload: a random "file" of --file-tokens tokens sent --file-requests times, each time a few
tokens longer (as an editor re-sends the file at each keystroke); time to first token of each
request with Engine(prefix_cache_tokens=...) vs without, the first request excluded (it fills the
cache), and the outputs compared.
Timed by this process's CPU time with one thread (`--clock cpu`, the default: time spent descheduled
by other jobs on a shared machine is not counted) or the wall clock. The last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mellum2 import Mellum2, ModelConfig, load_pretrained  # noqa: E402
from mellum2.infer.engine import Engine  # noqa: E402
from mellum2.infer.sampling import SamplingParams  # noqa: E402
from mellum2.locate import resolve_model_dir  # noqa: E402

CLOCK = [time.process_time]


def mixed_load(n, max_prompt, max_new, vocab, seed=0):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p = [rng.randrange(3, vocab) for _ in range(rng.randint(16, max_prompt))]
        reqs.append((p, SamplingParams(max_new_tokens=rng.randint(8, max_new), ignore_eos=True)))
    return reqs


def continuous(model, reqs, slots, chunk):
    eng = Engine(model, max_num_seqs=slots, prefill_chunk=chunk)
    t0 = CLOCK[0]()
    rids = [eng.submit(p, sp) for p, sp in reqs]
    res = eng.run_until_done()
    return CLOCK[0]() - t0, [res[r].tokens for r in rids]


def one_at_a_time(model, reqs, chunk):
    eng = Engine(model, prefill_chunk=chunk)
    t0 = CLOCK[0]()
    out = [eng.generate([p], sp)[0].tokens for p, sp in reqs]
    return CLOCK[0]() - t0, out


def static(model, reqs, slots, chunk):
    eng = Engine(model, prefill_chunk=chunk)
    t0 = CLOCK[0]()
    out = []
    for i in range(0, len(reqs), slots):
        batch = reqs[i:i + slots]
        out += [r.tokens for r in eng.generate([p for p, _ in batch], [sp for _, sp in batch])]
    return CLOCK[0]() - t0, out


def file_ttft(model, args, cache_tokens):
    """Time to first token of each growing-file request (the engine stepped until its first token)."""
    rng = random.Random(1)
    text = [rng.randrange(3, model.cfg.vocab_size) for _ in range(args.file_tokens + 8 * args.file_requests)]
    eng = Engine(model, prefill_chunk=args.chunk, prefix_cache_tokens=cache_tokens)
    ttft, outs = [], []
    for i in range(args.file_requests):
        p = text[:args.file_tokens + 8 * i]
        t0 = CLOCK[0]()
        rid = eng.submit(p, SamplingParams(max_new_tokens=8, ignore_eos=True))
        toks = []
        while not toks:
            toks += [t for d in eng.step() for t in d.token_ids]
        ttft.append(CLOCK[0]() - t0)
        outs.append(toks + eng.run_until_done()[rid].tokens[1:])
    return ttft[1:], outs, eng.stats()["cached_tokens"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="a preset or config.json for random weights (default tiny)")
    p.add_argument("--model", default=None, help="checkpoint or run directory (instead of --config)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--slots", type=int, default=16, help="max_num_seqs of continuous and the static batch size")
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256, help="prefill_chunk")
    p.add_argument("--file-tokens", type=int, default=768)
    p.add_argument("--file-requests", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clock == "wall":
        CLOCK[0] = time.perf_counter
    torch.manual_seed(0)
    if args.model:
        model = load_pretrained(resolve_model_dir(args.model)).eval()
        name = args.model
    else:
        model = Mellum2(ModelConfig.from_spec(args.config)).eval()
        name = f"{args.config} (random weights)"
    out = {"model": name, "requests": args.requests, "slots": args.slots, "clock": args.clock}

    reqs = mixed_load(args.requests, args.max_prompt, args.max_new, model.cfg.vocab_size)
    total = sum(sp.max_new_tokens for _, sp in reqs)
    continuous(model, reqs[:2], args.slots, args.chunk)  # warm-up (allocator, first calls)
    t_one, want = one_at_a_time(model, reqs, args.chunk)
    t_cont, got_c = continuous(model, reqs, args.slots, args.chunk)
    t_stat, got_s = static(model, reqs, args.slots, args.chunk)
    out.update(new_tokens=total, one_at_a_time_tok_s=round(total / t_one, 1),
               static_tok_s=round(total / t_stat, 1), continuous_tok_s=round(total / t_cont, 1),
               continuous_vs_one=round(t_one / t_cont, 2), continuous_vs_static=round(t_stat / t_cont, 2),
               equal=got_c == want and got_s == want)
    print(f"mixed load, {args.requests} requests, {total} new tokens, {args.slots} slots:")
    print(f"  one at a time {out['one_at_a_time_tok_s']:8.1f} tok/s")
    print(f"  static        {out['static_tok_s']:8.1f} tok/s")
    print(f"  continuous    {out['continuous_tok_s']:8.1f} tok/s  ({out['continuous_vs_one']}x one at a time, "
          f"{out['continuous_vs_static']}x static; outputs equal: {out['equal']})")

    if args.file_requests > 1:
        cold, outs_cold, _ = file_ttft(model, args, 0)
        warm, outs_warm, cached = file_ttft(model, args, 4 * (args.file_tokens + 8 * args.file_requests))
        out.update(file_ttft_ms_no_cache=round(1e3 * statistics.median(cold), 1),
                   file_ttft_ms_cache=round(1e3 * statistics.median(warm), 1),
                   file_ttft_ratio=round(statistics.median(cold) / statistics.median(warm), 2),
                   file_cached_tokens=cached, file_equal=outs_cold == outs_warm)
        print(f"growing file of {args.file_tokens}+ tokens, {args.file_requests} requests: time to first token "
              f"{out['file_ttft_ms_no_cache']} ms without the prefix cache, {out['file_ttft_ms_cache']} ms with it "
              f"({out['file_ttft_ratio']}x; {cached} prompt tokens reused; outputs equal: {out['file_equal']})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
