"""Forward-pass time of our Mellum2 vs transformers' MellumForCausalLM, same config and weights.

Config: the `tiny` preset (18M params, 16 experts top-2) without MTP, batch 8 x 512 tokens, in fp32
and under bf16 autocast; transformers with each experts implementation it offers (eager,
batched_mm, grouped_mm), its fastest taken as the peer. Prints a table and the ratios; the last
stdout line is one JSON object.

    .venv/bin/python benchmarks/forward.py [--batch 8] [--seq 512] [--iters 5]
"""
import argparse
import json
import tempfile
import time

import torch

from mellum2.allocator import keep_freed_memory  # noqa: E402
from mellum2 import Mellum2, ModelConfig


def timeit(fn, iters):
    fn()  # warm-up
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    keep_freed_memory()  # mellum2/allocator.py; process-wide, so both sides of the comparison get it
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    import transformers

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(a.preset, num_nextn_predict_layers=0)
    ours = Mellum2(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        peers = {impl: transformers.MellumForCausalLM.from_pretrained(d, experts_implementation=impl).eval()
                 for impl in ("eager", "batched_mm", "grouped_mm")}
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
    res = {}
    for prec in ("fp32", "bf16"):
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if prec == "bf16" else torch.no_grad

        def run(m):
            with torch.no_grad(), ctx():
                return m(ids).logits

        res[f"ours_{prec}_s"] = timeit(lambda: run(ours), a.iters)
        for impl, m in peers.items():
            res[f"hf_{impl}_{prec}_s"] = timeit(lambda: run(m), a.iters)
        best = min(res[f"hf_{impl}_{prec}_s"] for impl in peers)
        res[f"speedup_{prec}"] = best / res[f"ours_{prec}_s"]
        with torch.no_grad(), ctx():
            res[f"max_abs_logit_diff_{prec}"] = (run(ours) - run(peers["grouped_mm"])).abs().max().item()
    tok = a.batch * a.seq
    print(f"{a.preset}: {ours.num_params():,} params, batch {a.batch} x {a.seq}, forward only, {torch.get_num_threads()} threads")
    print(f"{'':<22}{'fp32 s':>10}{'tok/s':>10}{'bf16 s':>10}{'tok/s':>10}")
    for name in ["ours"] + [f"hf_{i}" for i in peers]:
        f, b = res[f"{name}_fp32_s"], res[f"{name}_bf16_s"]
        print(f"{name:<22}{f:>10.3f}{tok / f:>10.0f}{b:>10.3f}{tok / b:>10.0f}")
    print(f"speedup vs transformers' fastest: fp32 {res['speedup_fp32']:.2f}x, bf16 {res['speedup_bf16']:.2f}x")
    print(json.dumps({"benchmark": "forward", "preset": a.preset, "batch": a.batch, "seq": a.seq, **res}))


if __name__ == "__main__":
    main()
