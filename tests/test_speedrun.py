"""`mellum2 speedrun`: a killed run continues from the last finished stage (checked with a fake, fast
stage list run in a child process that is killed mid-stage), missing stages are "not available",
a failed evaluation does not stop the run, the report has a table per stage and the wall times."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mellum2.eval import report, speedrun
from mellum2.eval.speedrun import Stage

ROOT = Path(__file__).parent.parent


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def fake_stages() -> list[Stage]:
    count = "import pathlib; p = pathlib.Path('count-{0}'); p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
    return [
        Stage("one", py(count.format("one") + "pathlib.Path('one').mkdir(exist_ok=True)"), kind="train",
              full_command=True),
        # the first attempt hangs (and is killed); the second finds its marker and finishes
        Stage("two", py(count.format("two") + "import time\nif not pathlib.Path('m').exists():\n"
                        "    pathlib.Path('m').touch(); time.sleep(120)\n"
                        "import json; pathlib.Path('eval').mkdir(exist_ok=True)\n"
                        "pathlib.Path('eval/two.json').write_text(json.dumps({'score': 0.5}))"),
              needs=("one",), full_command=True, result="eval/two.json"),
        Stage("three", ["no-such-stage", "--x"], needs=("one",)),
        Stage("four", py("raise SystemExit(3)"), full_command=True),
        Stage("five", py(count.format("five")), full_command=True, needs=("one",)),
    ]


RUNNER = ("import sys; sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})\n"
          "from pathlib import Path\nfrom mellum2.eval import speedrun\nimport test_speedrun as t\n"
          "speedrun.run_stages(t.fake_stages(), Path(sys.argv[1]), available={{'eval'}})\n")


def test_a_killed_speedrun_continues_from_the_last_finished_stage(tmp_path):
    out = tmp_path / "run"
    code = RUNNER.format(root=str(ROOT), tests=str(Path(__file__).parent))
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until stage two is running
        st = out / "state.json"
        if st.is_file() and json.loads(st.read_text())["stages"].get("two", {}).get("status") == "started" \
                and (out / "m").exists():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("stage two never started")
    os.killpg(p.pid, signal.SIGKILL)  # the speedrun and its stage, as a kill of the terminal's job would
    p.wait()
    state = json.loads((out / "state.json").read_text())["stages"]
    assert state["one"]["status"] == "done" and state["two"]["status"] == "started"

    lines = []
    state = speedrun.run_stages(fake_stages(), out, say=lines.append, available={"eval"})["stages"]
    assert (out / "count-one").read_text() == "x"        # not run again
    assert (out / "count-two").read_text() == "xx"       # the killed stage ran again, and finished
    assert state["two"]["status"] == "done" and state["two"]["wall_s"] < 30
    assert state["three"]["status"] == "not available" and "no-such-stage" in state["three"]["reason"]
    assert state["four"]["status"] == "failed" and state["four"]["rc"] == 3
    assert state["five"]["status"] == "done"             # a failed evaluation does not stop the run
    assert any("done earlier" in x for x in lines)

    md = report.build(out, fake_stages(), {"preset": "test", "stages": state})
    assert "| two " in md and "score" in md and "0.500" in md and "not available" in md
    assert "## Versions" in md and "torch" in md


def test_a_failed_training_stage_stops_the_run(tmp_path):
    st = [Stage("a", py("raise SystemExit(1)"), kind="train", full_command=True),
          Stage("b", py("open('b', 'w')"), full_command=True)]
    state = speedrun.run_stages(st, tmp_path, say=lambda *_: None, available=set())
    assert state["stages"]["a"]["status"] == "failed" and "b" not in state["stages"]


def test_presets_build_every_stage():
    for name in speedrun.PRESETS:
        names = [s.name for s in speedrun.stages(name)]
        assert names[:6] == ["data", "pretrain", "long-context", "sft-instruct", "sft-thinking", "rl"]
        assert {"eval-bpb", "eval-humaneval", "eval-infill", "eval-completion", "eval-mtp", "eval-passkey",
                "eval-chat-instruct", "eval-rl-reward"} <= set(names)
    pre = next(s for s in speedrun.stages("smoke") if s.name == "pretrain").argv
    assert pre[pre.index("--max-steps") + 1] == "6"  # the preset overrides the demo's arguments
    assert speedrun._override(["--a", "1", "--b", "2"], ["--b", "3", "--c", "4"]) == ["--a", "1", "--b", "3", "--c", "4"]
