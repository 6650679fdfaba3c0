"""`mellum2 speedrun` (and `make speedrun`): the whole recipe in one command, with a report card.

    mellum2 speedrun                                  # the default preset: <= 30 min on 2 CPU cores
    mellum2 speedrun --preset gpu --device cuda --out runs/speedrun-gpu
    mellum2 speedrun --out runs/speedrun              # again after a kill: continues at the first unfinished stage

A linear list of stages, each one `mellum2 <stage> ...` command run as a child process with its output
in OUT/logs/<stage>.log: the corpus and its tokenizer -> three-phase pre-training -> the long-context
stage -> SFT Instruct and Thinking -> RL -> every evaluation (their JSON in OUT/eval/) -> OUT/report.md
(report.py). OUT/state.json records each stage's status, command and wall time, written atomically
after every stage, so a killed speedrun continues from the last finished stage (a training stage that
was interrupted resumes from its own newest checkpoint with `--resume`). A stage whose `mellum2`
command does not exist in this installation, or whose input model is missing, is reported "not
available" and checked again on the next run, so the speedrun runs today and completes when the
post-training stages exist. A failed evaluation is reported and the speedrun goes on; a failed training
stage stops it (what follows needs its model).

Presets are plain dicts of the knobs that set the run's size (`PRESETS`); pre-training takes the
demo's arguments (mellum2.train.pretrain.DEMO_ARGS), so improvements to the demo's recipe carry over.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mellum2 import atomic
from mellum2.errors import UsageError

PRESETS: dict[str, dict] = {
    # 2 CPU cores, <= 30 minutes
    "default": {"vocab": 8192, "pretrain": [], "long_steps": 20, "long_len": 2048, "sft_steps": 80, "rl_steps": 4,
                "sft": ["--seq-len", "1024", "--batch-size", "4", "--lr", "1e-3"],
                "bpb_files": 40, "he_limit": 164, "he_tokens": 128, "infill_limit": 100, "completion_files": 20,
                "mtp_files": 8, "passkey_lengths": "512,1024,2048", "chat_n": 60, "rl_n": 60},
    # a minutes-long check of the whole pipeline
    "smoke": {"vocab": 4096, "pretrain": ["--max-steps", "6", "--save-every", "3", "--batch-size", "4",
                                          "--seq-len", "256", "--log-every", "1"],
              "long_steps": 2, "long_len": 1024, "sft_steps": 2, "rl_steps": 1, "bpb_files": 4, "he_limit": 8,
              "he_tokens": 32, "infill_limit": 8, "completion_files": 4, "mtp_files": 2, "mtp_compile": False,
              "passkey_lengths": "512,1024", "chat_n": 8, "rl_n": 8},
    # a GPU: a longer pre-training, the full evaluations
    "gpu": {"vocab": 8192, "pretrain": ["--max-steps", "2000", "--batch-size", "32", "--seq-len", "1024",
                                        "--save-every", "500"],
            "long_steps": 200, "long_len": 4096, "sft_steps": 300, "rl_steps": 40, "bpb_files": 40, "he_limit": 164,
            "he_tokens": 256, "infill_limit": 0, "completion_files": 40, "mtp_files": 16,
            "passkey_lengths": "1024,2048,4096", "chat_n": 200, "rl_n": 200},
}


@dataclass
class Stage:
    name: str
    argv: list[str]                      # `mellum2` arguments (argv[0] is the mellum2 stage), or a full command
    kind: str = "eval"                   # "train" (a failure stops the speedrun) or "eval"
    needs: tuple[str, ...] = ()          # paths (relative to OUT) that must exist: a model of an earlier stage
    resume: list[str] = field(default_factory=list)  # appended when a previous attempt left checkpoints
    resume_when: str | None = None       # ... under this directory (relative to OUT)
    result: str | None = None            # its JSON result (relative to OUT), for the report
    full_command: bool = False           # argv is a whole command (tests), not mellum2 arguments


def stages(preset: str = "default", device: str | None = None, data: str | None = None) -> list[Stage]:
    """The stage list of a preset. `data`: an already prepared corpus directory to use (linked as
    OUT/data) instead of preparing one."""
    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    from mellum2.train.pretrain import DEMO_ARGS  # the demo's recipe: what the tuning improves

    P = PRESETS[preset]
    dev = ["--device", device] if device else []
    pre = _override(DEMO_ARGS, P["pretrain"]) + ["--samples", "0", "--no-progress", "--no-tensorboard"]

    def ev(name, argv, model, needs=None):
        return Stage(f"eval-{name}", ["eval", *argv, "--model", model, "--json", f"eval/{name}.json", "--quiet", *dev],
                     needs=(needs or model,), result=f"eval/{name}.json")

    prepare = Stage("data", ["data", "prepare", "--out", "data", "--vocab-size", str(P["vocab"]), "--no-progress"],
                    kind="train")
    if data:
        link = f"import os; os.path.islink('data') or os.symlink({str(Path(data).resolve())!r}, 'data')"
        prepare = Stage("data", [sys.executable, "-c", link], kind="train", full_command=True)
    return [
        prepare,
        Stage("pretrain", ["train", *pre, "--data", "data", "--out", "pretrain", *dev], kind="train",
              needs=("data",), resume=["--resume"], resume_when="pretrain/checkpoints", result="pretrain/summary.json"),
        Stage("long-context", ["train", "--stage", "long-context", "--from", "pretrain", "--data", "data",
                               "--out", "long", "--rope-factor", "2", "--seq-len", str(P["long_len"]),
                               "--batch-size", "1", "--max-steps", str(P["long_steps"]), "--log-every", "2",
                               "--samples", "0", "--no-progress", "--no-tensorboard", *dev],
              kind="train", needs=("pretrain",), resume=["--resume"], resume_when="long/checkpoints",
              result="long/summary.json"),
        Stage("sft-instruct", ["sft", "--from", "long", "--mode", "instruct", "--out", "sft-instruct",
                               "--max-steps", str(P["sft_steps"]), *P.get("sft", []),
                               "--no-progress", "--no-tensorboard", *dev],
              kind="train", needs=("long",), resume=["--resume"], resume_when="sft-instruct/checkpoints",
              result="sft-instruct/summary.json"),
        Stage("sft-thinking", ["sft", "--from", "long", "--mode", "thinking", "--out", "sft-thinking",
                               "--max-steps", str(P["sft_steps"]), *P.get("sft", []),
                               "--no-progress", "--no-tensorboard", *dev],
              kind="train", needs=("long",), resume=["--resume"], resume_when="sft-thinking/checkpoints",
              result="sft-thinking/summary.json"),
        Stage("rl", ["rl", "--from", "sft-instruct", "--out", "rl", "--steps", str(P["rl_steps"]),
                     "--heldout", str(P["rl_n"]), "--no-progress", "--no-tensorboard"],
              kind="train", needs=("sft-instruct/config.json",), resume=["--resume"], resume_when="rl/checkpoints",
              result="rl/summary.json"),
        ev("bpb", ["bpb", "--n", str(P["bpb_files"])], "long"),
        ev("bpb-pretrain", ["bpb", "--n", str(P["bpb_files"])], "pretrain"),
        ev("humaneval", ["humaneval", "--limit", str(P["he_limit"]), "--max-new-tokens", str(P["he_tokens"]),
                         "--k", "1"], "long"),
        ev("infill", ["infill", "--modes", "single-line,multi-line,random-span",
                      *(["--limit", str(P["infill_limit"])] if P["infill_limit"] else []), "--max-new-tokens", "64"],
           "long"),
        ev("completion", ["completion", "--files", str(P["completion_files"]), "--contexts", "128,512"], "long"),
        ev("mtp", ["mtp", "--files", str(P["mtp_files"]), *(["--compile"] if P.get("mtp_compile", True) else [])],
           "long"),
        ev("passkey", ["passkey", "--lengths", P["passkey_lengths"], "--samples", "2"], "long"),
        ev("ppl", ["ppl-by-position", "--length", P["passkey_lengths"].split(",")[-1], "--n", "2"], "long"),
        ev("chat-instruct", ["chat", "--n", str(P["chat_n"])], "sft-instruct", "sft-instruct/config.json"),
        ev("chat-thinking", ["chat", "--think", "--n", str(P["chat_n"])], "sft-thinking", "sft-thinking/config.json"),
        ev("rl-reward", ["rl", "--n", str(P["rl_n"])], "rl", "rl/summary.json"),
    ]


def _override(args: list[str], over: list[str]) -> list[str]:
    """`args` (flag value pairs) with the flags of `over` replaced or added."""
    out = list(args)
    for i in range(0, len(over), 2):
        flag, val = over[i], over[i + 1]
        if flag in out:
            out[out.index(flag) + 1] = val
        else:
            out += [flag, val]
    return out


def cli_stages() -> set[str]:
    from mellum2.cli import STAGES  # the dispatcher's table: which `mellum2 <stage>` exist here

    return set(STAGES)


def _load_state(out: Path) -> dict:
    f = out / "state.json"
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            raise UsageError(f"{f}: not JSON (a damaged speedrun state; delete it to start over)") from None
    return {"stages": {}}


def run_stages(todo: list[Stage], out: Path, say: Callable = print, available: set[str] | None = None) -> dict:
    """Run the stages not yet done, in order; returns the state (also in OUT/state.json)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    state = _load_state(out)
    available = cli_stages() if available is None else available
    t_all = time.perf_counter()
    for i, st in enumerate(todo, 1):
        rec = state["stages"].get(st.name, {})
        tag = f"[{i}/{len(todo)}] {st.name}"
        if rec.get("status") == "done":
            say(f"{tag}: done earlier ({rec['wall_s']:.0f} s)")
            continue
        missing = [n for n in st.needs if not (out / n).exists()]
        if not st.full_command and st.argv[0] not in available:
            rec = {"status": "not available", "reason": f"`mellum2 {st.argv[0]}` is not in this installation"}
        elif missing:
            rec = {"status": "not available", "reason": f"needs {', '.join(missing)} (an earlier stage's output)"}
        else:
            rec = _run_one(st, out, tag, say, resumed=rec.get("status") in ("started", "failed"))
        state["stages"][st.name] = rec
        atomic.write_json(out / "state.json", state)
        if rec["status"] != "done":
            say(f"{tag}: {rec['status']} ({rec.get('reason', '')})")
        if rec["status"] == "failed" and st.kind == "train":
            break
    state["wall_s_this_run"] = time.perf_counter() - t_all
    atomic.write_json(out / "state.json", state)
    return state


def _run_one(st: Stage, out: Path, tag: str, say, resumed: bool) -> dict:
    argv = list(st.argv)
    if resumed and st.resume and st.resume_when and (out / st.resume_when).is_dir() \
            and any((out / st.resume_when).iterdir()):
        argv += st.resume
    cmd = argv if st.full_command else [sys.executable, "-m", "mellum2.cli", *argv]
    shown = " ".join(argv if st.full_command else ["mellum2", *argv])
    say(f"{tag}: {shown}")
    state = _load_state(out)
    state["stages"][st.name] = {"status": "started", "command": shown}
    atomic.write_json(out / "state.json", state)
    log = out / "logs" / f"{st.name}.log"
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"$ {shown}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, cwd=out, stdout=f, stderr=subprocess.STDOUT, env=_env()).returncode
    wall = time.perf_counter() - t0
    rec = {"status": "done" if rc == 0 else "failed", "command": shown, "wall_s": wall, "rc": rc,
           "log": str(log.relative_to(out))}
    if rc != 0:
        rec["reason"] = f"exit status {rc}; see {rec['log']}"
    else:
        say(f"{tag}: done in {wall:.0f} s")
    return rec


def _env() -> dict:
    """The children import this same mellum2 (also from a source tree on PYTHONPATH)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def main(argv: list[str] | None = None) -> int:
    from . import report  # the report card (matplotlib and friends only at the end)

    ap = argparse.ArgumentParser(prog="mellum2 speedrun", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default", help=f"run size: {', '.join(PRESETS)}")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="training device (default: the trainers' choice)")
    ap.add_argument("--out", default="runs/speedrun", help="run directory (report.md goes here)")
    ap.add_argument("--only", help="comma-separated stage names to run (the rest keep their state)")
    ap.add_argument("--data", help="an already prepared corpus (`mellum2 data prepare --out DIR`) instead of the "
                                   "data stage")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT/report.md from OUT/state.json, run nothing")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    if a.data and not (Path(a.data) / "index.json").is_file():
        raise UsageError(f"--data {a.data}: not a prepared corpus (no index.json there)")
    todo = stages(a.preset, a.device, a.data)
    if a.report_only:
        if not (out / "state.json").is_file():
            raise UsageError(f"--report-only: {out} holds no speedrun (no state.json)")
        state = _load_state(out)
        print(f"report: {report.write(out, stages(state.get('preset', a.preset), a.device, a.data), state)}")
        return 0
    if a.only:
        names = set(a.only.split(","))
        unknown = names - {s.name for s in todo}
        if unknown:
            raise UsageError(f"--only {','.join(sorted(unknown))}: no such stage (have {', '.join(s.name for s in todo)})")
        todo = [s for s in todo if s.name in names]
    prev = _load_state(out).get("preset")
    if prev and prev != a.preset:
        raise UsageError(f"--out {out} holds a speedrun with preset {prev!r}, not {a.preset!r}: use another --out")
    state = _load_state(out)
    state["preset"] = a.preset
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "state.json", state)
    print(f"mellum2 speedrun: preset {a.preset}, {len(todo)} stages -> {out}")
    state = run_stages(todo, out)
    path = report.write(out, stages(a.preset, a.device, a.data), state)
    print(f"report: {path}")
    failed = [n for n, r in state["stages"].items() if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    from mellum2.errors import run_stage

    sys.exit(run_stage("speedrun", main))
