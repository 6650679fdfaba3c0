"""Training throughput: our training step vs transformers' MellumForCausalLM + torch.optim.AdamW.

Same `tiny`-sized config (18M params, 16 experts top-2) without MTP for the comparison, batch 8 x 512,
fp32 and bf16 autocast (fp32 masters in both). Measured per system:
  fwd+bwd    forward with labels (CE + router losses) and backward; ours as the trainer calls it,
             `return_logits=False` (the loss without materialising logits, model/head_loss.py), the
             peer as its trainers do (it has no such option: logits come back with the loss)
  step       the full optimiser step: ours is `Trainer.train_step` (global token normalisation, grad
             clip, Muon + AdamW, one host sync); the peer does fwd+bwd + clip + AdamW + zero_grad
transformers is run with each experts implementation 5.18 offers on CPU (eager, batched_mm,
grouped_mm) and with `output_router_logits=True` so its loss includes the load-balancing term like
ours; its fastest is the peer. Ours with MTP on (the real recipe) is reported too.

`ours_compiled` is our step with `--compile` (torch.compile per decoder layer, inductor on CPU),
bf16 only (torch's grouped_mm compiles only in bf16; fp32 would graph-break at every expert matmul).
Timings: all configurations live in one process and are timed interleaved, round by round (best
round counts; the ratios are also given as the median over rounds of each round's own ratio, which
one side's lucky round cannot move), so a shared machine's changing load falls on all alike; one precision after the other,
each warmed up first, and in every round each model runs one untimed pass before its timed ones (the
first pass after another model's, or after the other precision, ran up to 2x slower here and had
made an earlier version of this script misreport fwd+bwd). Peak RSS: each configuration
once more in its own subprocess (warm-up + one step). transformers' batched_mm (50x slower, 16 GiB)
only gets that one-step figure. Achieved FLOP/s = accounting.flops_per_token(cfg, seq)["train"] x
step tok/s, against the matmul peak this script measures (square bf16 / fp32 GEMMs, all threads).

    .venv/bin/python benchmarks/train_throughput.py [--config tiny] [--batch 8] [--seq 512] [--iters 3]
        [--precisions fp32,bf16] [--threads N] [--skip-batched-mm] [--skip-memory] [--kinds ours,hf_eager]

`--config` is a preset name or a config.json (benchmarks/configs/ holds other shapes: moe64.json is
`tiny` with 12B's routing, 64 experts top-8); `--kinds` picks the configurations (default all).

The last stdout line is one JSON object.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mellum2.allocator import keep_freed_memory  # noqa: E402
from mellum2 import Mellum2, ModelConfig  # noqa: E402
from mellum2.model.accounting import flops_per_token  # noqa: E402

class _Repeat:
    """A loader that yields the same batch forever (throughput does not care what the tokens are)."""

    def __init__(self, batch):
        self.batch, self.phase = batch, 0

    def __iter__(self):
        while True:
            yield self.batch


def load_config(spec: str, mtp: bool) -> ModelConfig:
    """A preset name or a config.json path; MTP on or off."""
    return ModelConfig.from_spec(spec).replace(num_nextn_predict_layers=int(mtp))


CONFIG = "tiny"  # set by --config (and passed on to the memory subprocesses)


def build(kind: str, batch: int, seq: int):
    """(fwd_bwd(prec), step(prec), cfg) for 'ours', 'ours_mtp', 'ours_compiled' or 'hf_<impl>'."""
    torch.manual_seed(0)
    cfg = load_config(CONFIG, kind == "ours_mtp")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def ctx(prec):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16")

    if kind.startswith("ours"):
        from mellum2.train.optim import build_optimizers
        from mellum2.train.parallel import Dist, install_count_reducer, parallelize
        from mellum2.train.trainer import Trainer

        model = Mellum2(cfg).train()
        parallelize(model, Dist(), compile=kind == "ours_compiled", precision="bf16")
        opts = build_optimizers(model, 1e-3)
        batch_d = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(seq).expand(batch, seq)}
        trainers = {prec: Trainer(model, opts, lambda s: 1e-3, _Repeat(batch_d), Dist(), precision=prec,
                                  tap=install_count_reducer(model, Dist())) for prec in ("fp32", "bf16")}

        def fwd_bwd(prec):
            with ctx(prec):
                out = model(ids, labels=ids, return_logits=False)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        def step(prec):
            trainers[prec].train_step()
    else:
        import transformers

        with tempfile.TemporaryDirectory() as d:
            Mellum2(cfg).save_pretrained(d)
            model = transformers.MellumForCausalLM.from_pretrained(d, experts_implementation=kind.removeprefix("hf_"),
                                                                   dtype=torch.float32).train()
        model.config.output_router_logits = True
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

        def fwd_bwd(prec):
            with ctx(prec):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        def step(prec):
            with ctx(prec):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss.item()

    return fwd_bwd, step, cfg


def _precs(kind: str, precs: list[str]) -> list[str]:
    return [p for p in precs if not (kind == "ours_compiled" and p == "fp32")]


def one(kind: str, precs: list[str], batch: int, seq: int) -> dict:
    """Peak RSS of one configuration in its own process (warm-up + one full step per precision)."""
    fwd_bwd, step, _ = build(kind, batch, seq)
    t = {}
    for prec in _precs(kind, precs):
        step(prec)
        t0 = time.perf_counter()
        step(prec)
        t[prec] = time.perf_counter() - t0
    return {"kind": kind, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "one_step_tok_s": {p: batch * seq / v for p, v in t.items()}}


def matmul_peak(dtype, n=2048, seconds=1.0) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    it, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        it += 1
    return 2 * n ** 3 * it / (time.perf_counter() - t0)


def main():
    keep_freed_memory()  # mellum2/allocator.py; process-wide, so both sides of the comparison get it
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny", help="preset name or config.json")
    ap.add_argument("--kinds", default=None, help="comma-separated subset of the configurations")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=3, help="interleaved rounds; the best round counts")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--skip-batched-mm", action="store_true", help="skip transformers' batched_mm (16 GiB, slow)")
    ap.add_argument("--skip-memory", action="store_true", help="no per-configuration peak-RSS subprocesses")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    precs = a.precisions.split(",")
    global CONFIG
    CONFIG = a.config
    if a.one:
        print(json.dumps(one(a.one, precs, a.batch, a.seq)))
        return
    kinds = ["ours", "ours_compiled", "ours_mtp", "hf_eager", "hf_grouped_mm"]
    if a.kinds:
        kinds = [k for k in kinds if k in a.kinds.split(",")]
    mem = {}
    for kind in [] if a.skip_memory else kinds + ([] if a.skip_batched_mm else ["hf_batched_mm"]):
        cmd = [sys.executable, __file__, "--one", kind, "--config", a.config, "--precisions", a.precisions,
               "--batch", str(a.batch),
               "--seq", str(a.seq)] + (["--threads", str(a.threads)] if a.threads else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{kind}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        mem[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    # timing: every configuration in this process, interleaved round by round, so a busy machine's
    # load falls on all of them alike; batched_mm (50x slower, 16 GiB) only gets its one-step figure
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    built = {k: build(k, a.batch, a.seq) for k in kinds}
    best: dict = {}
    times: dict = {}  # every round's time, for the per-round (paired) ratios
    for prec in precs:  # one precision at a time: switching dtypes makes oneDNN rebuild its kernels
        for k, (fb, st, _) in built.items():
            if prec in _precs(k, precs):
                fb(prec)
                st(prec)  # warm-up (and compilation)
        for _ in range(a.iters):
            for k, (fb, st, _) in built.items():
                if prec not in _precs(k, precs):
                    continue
                fb(prec)  # untimed: the first pass after another model's is slower (allocator, kernel caches)
                for name, fn in (("fwd_bwd", fb), ("step", st)):
                    t0 = time.perf_counter()
                    fn(prec)
                    dt = time.perf_counter() - t0
                    best[(k, prec, name)] = min(best.get((k, prec, name), float("inf")), dt)
                    times.setdefault((k, prec, name), []).append(dt)
    tok = a.batch * a.seq
    res = {"benchmark": "train_throughput", "config": a.config, "batch": a.batch, "seq": a.seq,
           "threads": torch.get_num_threads(), "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()}}
    print(f"{a.config} (no MTP unless noted), batch {a.batch} x {a.seq}, {torch.get_num_threads()} threads, best of "
          f"{a.iters} interleaved rounds; matmul peak measured: bf16 {peaks['bf16'] / 1e9:.0f}, "
          f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s")
    print(f"{'':<16}{'prec':>6}{'fwd+bwd tok/s':>15}{'step tok/s':>12}{'GFLOP/s':>9}{'of peak':>9}{'peak RSS':>10}")
    for k in kinds + ["hf_batched_mm"]:
        fpt = flops_per_token(load_config(a.config, k == "ours_mtp"), a.seq)["train"]
        for prec in _precs(k, precs):
            if k in built:
                fb_s, st_s = tok / best[(k, prec, "fwd_bwd")], tok / best[(k, prec, "step")]
            elif k in mem:
                fb_s, st_s = float("nan"), mem[k]["one_step_tok_s"][prec]
            else:
                continue
            gf = st_s * fpt / 1e9
            rss = mem.get(k, {}).get("peak_rss_mib", float("nan"))
            res[f"{k}_{prec}"] = {"fwd_bwd_tok_s": fb_s, "step_tok_s": st_s, "step_gflops": gf,
                                  "step_share_of_peak": gf * 1e9 / peaks[prec], "peak_rss_mib": rss,
                                  "train_flops_per_token": fpt}
            rss_s = "-" if rss != rss else f"{rss:,.0f}Mi"
            print(f"{k:<16}{prec:>6}{fb_s:>15,.0f}{st_s:>12,.0f}{gf:>9.1f}{gf * 1e9 / peaks[prec]:>9.1%}{rss_s:>10}")
    for prec in precs:
        hf = {k: res[f"{k}_{prec}"] for k in ("hf_eager", "hf_grouped_mm") if f"{k}_{prec}" in res}
        if not hf:
            continue
        peer_fb = max(hf, key=lambda k: hf[k]["fwd_bwd_tok_s"])
        peer_st = max(hf, key=lambda k: hf[k]["step_tok_s"])
        for ours in ("ours", "ours_compiled"):
            if f"{ours}_{prec}" not in res:
                continue
            o = res[f"{ours}_{prec}"]
            res[f"ratio_{ours}_fwd_bwd_{prec}"] = o["fwd_bwd_tok_s"] / hf[peer_fb]["fwd_bwd_tok_s"]
            res[f"ratio_{ours}_step_{prec}"] = o["step_tok_s"] / hf[peer_st]["step_tok_s"]
            # drift-robust companion: in each round, the faster transformers time over ours, then the
            # median over rounds (a lucky fast round of one side alone cannot move it)
            paired = {}
            for name in ("fwd_bwd", "step"):
                peer_t = [min(ts) for ts in zip(*(times[(h, prec, name)] for h in hf))]
                rs = (p_ / o_ for p_, o_ in zip(peer_t, times[(ours, prec, name)]))
                paired[name] = statistics.median(rs)
                res[f"ratio_{ours}_{name}_{prec}_paired_median"] = paired[name]
            print(f"{prec}: {ours} / transformers' fastest ({peer_fb}, {peer_st}): fwd+bwd "
                  f"{res[f'ratio_{ours}_fwd_bwd_{prec}']:.2f}x, full step {res[f'ratio_{ours}_step_{prec}']:.2f}x "
                  f"(median of per-round ratios: {paired['fwd_bwd']:.2f}x, {paired['step']:.2f}x)")
        res[f"peer_{prec}"] = peer_st
    print(json.dumps(res))


if __name__ == "__main__":
    main()
