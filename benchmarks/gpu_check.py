"""One script for a GPU: every figure of docs/scale.md's GPU table, sized for well under 10 minutes on
one H200 (random weights; the 12B model builds on the GPU in about a second).

Rows (each prints as soon as it is measured; a row that fails prints its error and the rest go on):
  fp8       correctness on the device: emulate vs scaled_mm (linear and grouped experts) at token
            counts that are not multiples of 16, forward and backward (no crash, equal values)
  decode    12B bf16: greedy batch 1 / 8 / 32 eager, batch 1 compiled (compile time reported),
            transformers' `generate` at batch 1 / 8 on a model of the same shape (its own random
            weights: speed does not depend on the values), speculative k = 1 / 2 (random MTP head)
  train     4-layer proxy at the full 12B width (+ MTP): forward+backward and the full Trainer step
            (Muon + AdamW, clip) in bf16, --fp8 (auto: scaled_mm linears, emulated experts), and
            --fp8-backend scaled_mm everywhere; tokens/s and MFU against --peak-tflops; batch
            4 x 4095 (a token count that is not a multiple of 16); start-up time before step 1
  muon      the optimiser step alone on the proxy (batched Newton-Schulz over the expert stacks)

    python benchmarks/gpu_check.py [--config mellum2-12b] [--skip-compile] [--skip-hf] [--peak-tflops 989]
    python benchmarks/gpu_check.py --device cpu --config tiny --train-batch 1 --train-seq 127 \
        --new-tokens 8 --skip-compile --peak-tflops 0.05        # the same code as a CPU dry run

Without CUDA it prints one line saying so and exits 0 (its last line is still a JSON object). The
last stdout line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mellum2 import Mellum2, ModelConfig  # noqa: E402
from mellum2.model.accounting import flops_per_token  # noqa: E402

RES: dict = {}
DEV = "cuda"  # --device cpu runs the same rows on the CPU (a dry run with a small --config)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def row(name: str, fn) -> None:
    """Run one measurement; print its line; keep going if it fails."""
    try:
        t0 = time.perf_counter()
        line, value = fn()
        RES[name] = value
        print(f"{name:<34} {line}   [{time.perf_counter() - t0:.0f} s]", flush=True)
    except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
        RES[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name:<34} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        traceback.print_exc(limit=3, file=sys.stderr)
    finally:
        if DEV == "cuda":
            torch.cuda.empty_cache()


def sync_time(fn, repeats=3, warmup=1):
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------- fp8
def fp8_rows():
    from mellum2.train.fp8 import Float8GroupedMM, fp8_linear

    # 12B's widths on a GPU; on the CPU (whose _scaled_mm is a slow reference) small odd ones
    D, N, I, Ms = (2304, 4096, 896, (30, 16380)) if DEV == "cuda" else (72, 40, 24, (30, 33))

    def linear():
        out = {}
        for M in Ms:
            x = torch.randn(M, D, device=DEV, requires_grad=True)
            w = torch.randn(N, D, device=DEV, requires_grad=True)
            g = torch.randn(M, N, device=DEV)
            r = {}
            for be in ("emulate", "scaled_mm"):
                x.grad = w.grad = None
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    y = fp8_linear(x, w, be)
                (y.float() * g).sum().backward()
                r[be] = (y.float(), x.grad, w.grad)
            out[M] = [float(((a - b).norm() / b.norm()).item()) for a, b in zip(r["emulate"], r["scaled_mm"])]
        worst = max(max(v) for v in out.values())
        return f"emulate vs scaled_mm, M={Ms}: max rel diff {worst:.2e} (fwd, dgrad, wgrad)", out

    def grouped():
        S = 1000 if DEV == "cuda" else 100
        x = torch.randn(S, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(8, D, I, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        offs = (torch.tensor([100, 100, 333, 500, 501, 700, 999, 1000]) * S // 1000).to(DEV, torch.int32)
        g = torch.randn(S, I, device=DEV, dtype=torch.bfloat16)
        r = {}
        for be in ("emulate", "scaled_mm"):
            x.grad = w.grad = None
            y = Float8GroupedMM(be)(x, w, offs=offs)
            y.backward(g)
            r[be] = (y.float(), x.grad.float(), w.grad.float())
        d = [float(((a - b).norm() / b.norm()).item()) for a, b in zip(r["emulate"], r["scaled_mm"])]
        return f"experts emulate vs scaled_mm (uneven groups): rel diff fwd/dgrad/wgrad {d}", d

    row("fp8 linear correctness", linear)
    row("fp8 grouped correctness", grouped)


# ---------------------------------------------------------------------------- decode
def decode_rows(cfg: ModelConfig, args):
    from mellum2.infer.engine import Engine
    from mellum2.infer.sampling import SamplingParams

    t0 = time.perf_counter()
    with torch.device(DEV):
        torch.manual_seed(0)
        model = Mellum2(cfg).to(torch.bfloat16).eval()
    sync()
    RES["decode_build_s"] = time.perf_counter() - t0
    n = args.new_tokens
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, cfg.vocab_size, (32, 64), generator=g).tolist()
    eng = Engine(model)

    def ours(e, B, **kw):
        def f():
            e.generate(prompts[:B], SamplingParams(max_new_tokens=8, ignore_eos=True), **kw)  # warm-up
            sync()
            t = time.perf_counter()
            e.generate(prompts[:B], SamplingParams(max_new_tokens=n, ignore_eos=True), **kw)
            sync()
            tok_s = B * n / (time.perf_counter() - t)
            return f"{tok_s:8.1f} tok/s (batch {B}, {n} new tokens, prefill included)", tok_s
        return f

    for B in (1, 8, 32):
        row(f"decode eager b{B}", ours(eng, B))
    for k in (1, 2):
        if model.mtp is not None:
            row(f"speculative eager k={k} b1", ours(eng, 1, speculative=True, draft_tokens=k))
    if not args.skip_compile:
        engc = Engine(model, compile=True)

        def compiled():
            t = time.perf_counter()
            engc.generate(prompts[:1], SamplingParams(max_new_tokens=8, ignore_eos=True))
            sync()
            RES["decode_compile_s"] = time.perf_counter() - t
            line, v = ours(engc, 1)()
            return f"{line}; compile {RES['decode_compile_s']:.0f} s", v

        row("decode compiled b1", compiled)
        del engc
    del eng, model
    if args.skip_hf:
        return
    import transformers

    hcfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf_dict().items()
                                                 if k not in ("num_nextn_predict_layers",)})
    with torch.device(DEV):
        hf = transformers.MellumForCausalLM._from_config(hcfg, dtype=torch.bfloat16).eval()

    def peer(B):
        def f():
            x = torch.tensor(prompts[:B], device=DEV)
            kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)
            with torch.no_grad():
                hf.generate(x, max_new_tokens=8, min_new_tokens=8, **kw)
                sync()
                t = time.perf_counter()
                hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
                sync()
            tok_s = B * n / (time.perf_counter() - t)
            return f"{tok_s:8.1f} tok/s (transformers generate, batch {B})", tok_s
        return f

    for B in (1, 8):
        row(f"decode transformers b{B}", peer(B))
    del hf


# ---------------------------------------------------------------------------- training
def proxy_config(cfg: ModelConfig) -> ModelConfig:
    """4 layers (3 sliding + 1 full) at the full width, MTP on: the 2.5B-parameter proxy."""
    return cfg.replace(num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                       mlp_layer_types=["sparse"] * 4)


class _Repeat:
    phase = 0

    def __init__(self, b):
        self.b = b

    def __iter__(self):
        while True:
            yield self.b


def train_rows(cfg: ModelConfig, args):
    from mellum2.train.optim import build_optimizers
    from mellum2.train.parallel import Dist, install_count_reducer, parallelize
    from mellum2.train.trainer import Trainer

    pcfg = proxy_config(cfg)
    B, T = args.train_batch, args.train_seq
    fpt = flops_per_token(pcfg, T)["train"]
    peak = args.peak_tflops * 1e12

    def setup(fp8, backend):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(DEV):
            model = Mellum2(pcfg)
        d = Dist(device=torch.device(DEV))
        parallelize(model, d, fp8=fp8, fp8_backend=backend, precision="bf16")
        opts = build_optimizers(model, 3e-4)
        ids = torch.randint(0, pcfg.vocab_size, (B, T), device=DEV)
        batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(T, device=DEV).expand(B, T)}
        tr = Trainer(model, opts, lambda s: 3e-4, _Repeat(batch), d, precision="bf16",
                     tap=install_count_reducer(model, d))
        tr.train_step()
        sync()
        return model, opts, tr, ids, time.perf_counter() - t0

    for name, fp8, backend in (("bf16", False, "auto"), ("fp8 auto", True, "auto"),
                               ("fp8 scaled_mm", True, "scaled_mm")):
        def f(fp8=fp8, backend=backend, name=name):
            model, opts, tr, ids, startup = setup(fp8, backend)

            def fb():
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    out = model(ids, labels=ids, return_logits=False)
                out.loss.backward()
                model.zero_grad(set_to_none=True)

            t_fb = sync_time(fb)
            t_step = sync_time(tr.train_step)
            t_opt = None
            if name == "bf16":  # the optimiser alone (grads from one backward)
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    model(ids, labels=ids, return_logits=False).loss.backward()
                t_opt = sync_time(opts.step, repeats=3)
            tok = B * T
            v = {"fwd_bwd_tok_s": tok / t_fb, "step_tok_s": tok / t_step, "mfu": tok / t_step * fpt / peak,
                 "startup_s": startup, "muon_adamw_step_s": t_opt,
                 "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")}
            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
            line = (f"step {v['step_tok_s']:9,.0f} tok/s (MFU {v['mfu']:.1%}), fwd+bwd {v['fwd_bwd_tok_s']:9,.0f} tok/s"
                    f", start-up {startup:.0f} s, peak {v['peak_mem_gib']:.0f} GiB"
                    + (f", optimiser step {t_opt * 1e3:.0f} ms" if t_opt else ""))
            del model, opts, tr
            return line, v

        row(f"train proxy {name} {B}x{T}", f)
    bf, f8 = RES.get(f"train proxy bf16 {B}x{T}", {}), RES.get(f"train proxy fp8 auto {B}x{T}", {})
    if "step_tok_s" in bf and "step_tok_s" in f8:
        RES["fp8_over_bf16"] = f8["step_tok_s"] / bf["step_tok_s"]
        print(f"{'fp8 auto / bf16 step':<34} {RES['fp8_over_bf16']:.2f}x", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="mellum2-12b", help="preset name or config.json")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=4095, help="4095: a token count that is not a multiple of 16")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--only", default="fp8,train,decode", help="which groups of rows")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a dry run of the same code (use a small --config, e.g. tiny)")
    a = ap.parse_args(argv)
    global DEV
    DEV = a.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; every GPU figure stays 'not measured'")
        print(json.dumps({"benchmark": "gpu_check", "cuda": False}))
        return 0
    cfg = ModelConfig.from_spec(a.config)
    RES.update(benchmark="gpu_check", cuda=DEV == "cuda", torch=torch.__version__,
               device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)")
    print(f"{RES['device']}, torch {torch.__version__}, config {a.config}", flush=True)
    groups = a.only.split(",")
    if "fp8" in groups:
        fp8_rows()
    if "train" in groups:
        train_rows(cfg, a)
    if "decode" in groups:
        decode_rows(cfg, a)
    print(json.dumps(RES, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
