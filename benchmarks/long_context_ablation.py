"""The Mellum 2 §4 ablation at `tiny` scale: from one base checkpoint and the same token budget,
extend the context with layer-selective YaRN (full-attention layers only, the Mellum 2 recipe), YaRN
on all layers, and unchanged RoPE; then compare passkey accuracy and perplexity by position.

    .venv/bin/python benchmarks/long_context_ablation.py --base runs/tiny [--factor 8] [--steps 60]

The base checkpoint's trained sequence length is its original context (`--original`, default the
`--seq-len` it was trained with, read from its run's args.json); the stage trains on `--seq-len`
tokens per row (repository-level samples, repo-level FIM; mellum2.data.longctx) for `--steps` steps.
Each variant is a `mellum2 train --stage long-context` run; evaluations are `mellum2.eval` calls.
Tables go to stdout and <out>/ablation.md; the last stdout line is one JSON object.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"selective": "full", "all-layers": "all", "unchanged": "none"}


def sh(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def evaluate(model_or_dir, lengths: list[int], ppl_len: int, samples: int, n_seqs: int, tok) -> dict:
    import torch

    from mellum2.eval import longdata, passkey, ppl
    from mellum2.model import load_pretrained, resolve_model_dir

    model = model_or_dir if not isinstance(model_or_dir, Path) else \
        load_pretrained(resolve_model_dir(model_or_dir), dtype="float32", mtp=False)
    model.eval()
    torch.manual_seed(0)
    pk = passkey.run(model, tok, lengths, [0.0, 0.25, 0.5, 0.75, 1.0], samples, seed=0)
    seqs = longdata.repo_sequences(tok, ppl_len, n_seqs)
    nll = ppl.nll_by_position(model, seqs)
    return {"passkey": pk["by_length"], "passkey_token_acc": pk["token_acc_by_length"],
            "passkey_nll": pk["nll_by_length"], "ppl": ppl.bucketed(nll, ppl.buckets_for(ppl_len, 128))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="base run directory or checkpoint")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--original", type=int, default=None, help="the base's trained context")
    ap.add_argument("--factor", type=float, default=8.0)
    ap.add_argument("--seq-len", type=int, default=2048, help="training rows of the stage")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=4, help="passkey samples per (length, depth)")
    ap.add_argument("--ppl-seqs", type=int, default=4)
    a = ap.parse_args()
    base, out = Path(a.base), Path(a.out)
    if a.original is None:
        args_json = base / "args.json"
        a.original = json.loads(args_json.read_text())["seq_len"] if args_json.exists() else None
        if a.original is None:
            sys.exit("--original: the base's trained context is unknown (no args.json); pass it")
    ext = int(a.original * a.factor)
    lengths = [n for n in (a.original, 2 * a.original, ext // 2, ext, 2 * ext) if n >= a.original]
    lengths = sorted(set(lengths))
    times = {}
    for name, layers in VARIANTS.items():
        run = out / name
        t = time.time()
        if not (run / "summary.json").exists():
            sh([sys.executable, "-m", "mellum2.cli", "train", "--stage", "long-context", "--from", str(base),
                "--rope-factor", str(a.factor), "--rope-layers", layers, "--original-context", str(a.original),
                "--seq-len", str(a.seq_len), "--max-steps", str(a.steps), "--batch-size", str(a.batch_size),
                "--lr", str(a.lr), "--out", str(run), "--save-every", "0", "--samples", "0", "--no-progress",
                "--log-every", "10"] + (["--resume"] if (run / "checkpoints").exists() else []))
            (run / "stage_seconds.txt").write_text(f"{time.time() - t:.1f}\n")
        f = run / "stage_seconds.txt"
        times[name] = float(f.read_text()) if f.exists() else float("nan")
    from mellum2.eval.cli import load_tokenizer
    from mellum2.model import resolve_model_dir
    from mellum2.train.long_context import extended_config, load_extended

    tok = load_tokenizer(str(out / "selective"), None)
    src = resolve_model_dir(base)
    no_train = load_extended(src, extended_config(src, a.factor, "full", a.original)).eval()
    models = {"base (RoPE, no stage)": Path(src), "selective YaRN, no training": no_train,
              **{f"{name} (trained)": out / name for name in VARIANTS}}
    results = {}
    for name, m in models.items():
        print(f"evaluating {name} ...", flush=True)
        t = time.time()
        results[name] = evaluate(m, lengths, 2 * ext, a.samples, a.ppl_seqs, tok)
        print(f"  {time.time() - t:.0f} s", flush=True)
    cols = " | ".join(str(n) for n in lengths)
    md = [f"Base: {src} (trained at {a.original} tokens); stage: {a.steps} steps x {a.batch_size} x {a.seq_len} "
          f"tokens, YaRN factor {a.factor:g} (extended context {ext}); `selective` = YaRN on the full-attention "
          f"layers only (Mellum 2), `all-layers` = YaRN everywhere, `unchanged` = plain RoPE everywhere.", ""]
    for key, title, fmt in (("passkey", "Passkey: exact greedy retrieval", "{:.2f}"),
                            ("passkey_token_acc", "Passkey: digit accuracy (teacher forced, chance 0.1)", "{:.2f}"),
                            ("passkey_nll", "Passkey: NLL per digit (uniform guess 2.30)", "{:.2f}")):
        md += [f"{title}, by prompt length (5 depths x {a.samples} samples):", "",
               "| model | " + cols + " |", "|---|" + "---|" * len(lengths)]
        for name, r in results.items():
            md.append(f"| {name} | " + " | ".join(fmt.format(r[key][n]) for n in lengths) + " |")
        md.append("")
    buckets = next(iter(results.values()))["ppl"]
    md += [f"Perplexity by position on held-out repository-level code ({a.ppl_seqs} x {2 * ext} tokens):", "",
           "| model | " + " | ".join(f"{b['from']}-{b['to']}" for b in buckets) + " |",
           "|---|" + "---|" * len(buckets)]
    for name, r in results.items():
        md.append(f"| {name} | " + " | ".join(f"{b['ppl']:.2f}" for b in r["ppl"]) + " |")
    md += ["", "Stage training loss (CE at the first and last logged step; same data and seed for every variant):", ""]
    for name in VARIANTS:
        recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        md.append(f"- {name}: CE {recs[0]['ce']:.3f} -> {recs[-1]['ce']:.3f} (mean of the last 10 steps "
                  f"{sum(r['ce'] for r in recs[-10:]) / len(recs[-10:]):.3f}), stage wall time {times[name]:.0f} s")
    text = "\n".join(md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    print(json.dumps({"benchmark": "long_context_ablation", "original": a.original, "factor": a.factor,
                      "stage_seconds": times, "results": results}))


if __name__ == "__main__":
    main()
