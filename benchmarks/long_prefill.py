"""Peak memory and time of a long prefill on `tiny`: sliding windows vs all-full attention, and our
blocked attention vs a dense T x T mask (what a naive implementation materialises).

Each configuration runs in a fresh subprocess so its peak RSS is its own; the figure reported is the
peak RSS minus the RSS after the model is built (activations, masks, scores). Prefill = the trunk
over T tokens and the logits of the last position, fp32, batch 1, no grad.

    .venv/bin/python benchmarks/long_prefill.py [--lengths 4096,16384,32768]
"""
import argparse
import json
import resource
import subprocess
import sys
import time


def worker(T: int, mode: str) -> dict:
    import torch

    from mellum2 import Mellum2, ModelConfig
    from mellum2.model.layers import MaskCache

    cfg = ModelConfig.from_preset("tiny", num_nextn_predict_layers=0)
    if mode == "full":  # no sliding windows: every layer attends to the whole prefix
        cfg = cfg.replace(layer_types=["full_attention"] * cfg.num_hidden_layers)
    if mode == "dense-mask":  # windows through one T x T boolean mask (SDPA's masked path)
        MaskCache.dense_max = 1 << 30
    torch.manual_seed(0)
    model = Mellum2(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with torch.no_grad():
        h, _ = model.trunk(ids)
        model.head(h[:, -1:])
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"T": T, "mode": mode, "seconds": dt, "tok_s": T / dt, "peak_extra_mib": (peak - base) / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("--dense-max", type=int, default=8192, help="skip the dense-mask mode above this length")
    ap.add_argument("--worker", nargs=2, metavar=("T", "MODE"))
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(int(a.worker[0]), a.worker[1])))
        return
    rows = []
    for T in [int(x) for x in a.lengths.split(",")]:
        for mode in ("sliding", "full", "dense-mask"):
            if mode == "dense-mask" and T > a.dense_max:
                continue
            out = subprocess.run([sys.executable, __file__, "--worker", str(T), mode], capture_output=True, text=True)
            if out.returncode:
                rows.append({"T": T, "mode": mode, "error": out.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"T={T:>6} {mode:<11}" + (f" {r['seconds']:8.2f} s {r['tok_s']:9.0f} tok/s  peak +{r['peak_extra_mib']:8.1f} MiB"
                                              if "error" not in r else f" failed: {r['error']}"), flush=True)
    print(json.dumps({"benchmark": "long_prefill", "preset": "tiny", "rows": rows}))


if __name__ == "__main__":
    main()
