"""The RL trainer on a tiny random model (seconds): rollouts from the engine (seeded per sample, the
sampler's logprobs equal to the trainer's), a smoke run of `mellum2 rl` with every metric and output,
exact resume, and the staleness bound. The verifier here is a stand-in (the parity of the reply's
length) so a random policy's groups disagree; the real verifiers are tested in test_verify.py."""
from __future__ import annotations

import json

import pytest
import torch

from mellum2.cli import main as cli_main
from mellum2.infer import Engine
from mellum2.model import Mellum2, ModelConfig, load_pretrained
from mellum2.posttrain import loo_advantages, rl, rl_tasks
from mellum2.posttrain.rollout import bootstrap_ci, paired_diff_ci, rollout
from mellum2.tokenizer import train_bpe
from mellum2.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
TEXTS = ["What is 3 + 4?\nThe answer is 7.\n", "def add(a, b):\n    return a + b\n", "Hello! 12 - 5 = 7\n"] * 20


def parity(task, msg):
    return float(len(msg.get("content") or "") % 2), "parity of the length"


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft") / "model"
    tok = train_bpe(TEXTS, 320)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("test-small", vocab_size=320, max_position_embeddings=512, eos_token_id=28)
    Mellum2(cfg).save_pretrained(d)
    tok.save(d)
    return d, tok


ARGS = ["--tasks", "math", "--difficulty", "1", "--steps", "3", "--prompts", "2", "--group", "4",
        "--max-new-tokens", "10", "--overlong-buffer", "3", "--train-tasks", "40", "--heldout", "6",
        "--lr", "1e-3", "--micro-batch", "5", "--no-tensorboard", "--no-progress"]


def _run(sft, out, *extra):
    return rl.run(rl.build_parser().parse_args(["--from", str(sft[0]), "--out", str(out), *ARGS, *extra]),
                  scorer=parity)


def test_rollout_groups_seeds_and_logprobs(sft):
    d, tok = sft
    model = load_pretrained(d, dtype=torch.float32).train()
    eng = Engine(model)
    tasks = rl_tasks("train", ["math"], n=3, difficulty=1)
    kw = dict(seed=1, step=0, max_new_tokens=10, overlong_buffer=3, scorer=parity)
    groups = rollout(eng, tok, tasks, 4, **kw)
    assert [len(g.samples) for g in groups] == [4, 4, 4]
    for g in groups:
        for s in g.samples:
            assert len(s.logprobs) == len(s.tokens) <= 10
            assert (s.dropped == "overlong") == (not s.finished)
            assert s.score == len(s.text.split("<|im_end|>")[0]) % 2 or s.dropped
    # a sample's tokens depend on its seed, not on the batch it ran in
    alone = rollout(eng, tok, tasks[:1], 4, **kw)
    assert [s.tokens for s in alone[0].samples] == [s.tokens for s in groups[0].samples]
    # the sampler's logprobs are the trainer's (pi_infer_old == pi_train_old up to numerics: IcePop keeps all)
    rows = [{"ids": g.prompt + s.tokens, "start": len(g.prompt), "logp_infer": s.logprobs, "adv": 0.0}
            for g in groups for s in g.samples]
    old, _, _ = rl.old_logprobs(model, rows, 5)
    for r, o in zip(rows, old):
        assert o.tolist() == pytest.approx(r["logp_infer"], abs=2e-4)


def test_smoke_run_writes_metrics_summary_plot_and_checkpoint(sft, tmp_path):
    out = tmp_path / "rl"
    assert cli_main(["rl", "--from", str(sft[0]), "--out", str(out), *ARGS]) == 0  # the real verifiers
    out2 = tmp_path / "rl2"
    _run(sft, out2, "--precision", "bf16")  # the trainer in bf16 autocast, the sampler in fp32
    recs = [json.loads(x) for x in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        for k in ("reward", "pass_rate", "response_length", "clip_frac", "icepop_masked_frac", "entropy",
                  "zero_variance_dropped", "overlong_dropped", "groups_used", "loss", "grad_norm"):
            assert k in r, k
        assert r["staleness"] == 0 and r["groups_sampled"] == 3  # ceil(1.5 x 2)
        assert r["groups_used"] <= 2
        assert r["icepop_masked_frac"] < 0.05
    assert any(not r["skipped"] for r in recs)
    s = json.loads((out2 / "summary.json").read_text())
    assert s["before"]["n"] == s["after"]["n"] == 6 and s["steps"] == 3
    assert s["before"]["ci95"][0] <= s["before"]["mean"] <= s["before"]["ci95"][1]
    assert (out2 / "rl.png").stat().st_size > 1000
    final = ckpt.latest(out2)
    assert final.name == "step_00000003" and (out2 / "tokenizer" / "tokenizer.json").exists()
    before, after = load_pretrained(sft[0]), load_pretrained(final / "model")
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
    assert torch.equal(before.mtp.fc.weight, after.mtp.fc.weight)  # the MTP head is not trained in RL


def test_resume_is_exact(sft, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(sft, a)
    _run(sft, b, "--steps", "1")
    _run(sft, b, "--resume")
    wa = load_pretrained(ckpt.latest(a) / "model").state_dict()
    wb = load_pretrained(ckpt.latest(b) / "model").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    timing = ("step_s", "rollout_s", "train_s", "tok_s", "mfu")
    ra, rb = ([{k: v for k, v in json.loads(x).items() if k not in timing}
               for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b))
    assert ra == rb
    with pytest.raises(Exception, match="already holds checkpoints"):
        _run(sft, b)
    with pytest.raises(Exception, match="cannot resume exactly"):
        _run(sft, b, "--resume", "--lr", "2e-3")


def test_staleness_is_bounded(sft, monkeypatch, tmp_path):
    real = rl.rollout

    def stale(*a, **k):
        k["version"] -= 1
        return real(*a, **k)
    monkeypatch.setattr(rl, "rollout", stale)
    with pytest.raises(AssertionError, match="stale"):
        _run(sft, tmp_path / "s", "--steps", "2")


def test_confidence_intervals():
    lo, hi = bootstrap_ci([0.0, 1.0] * 50)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.05, abs=0.03)  # normal approximation
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    m, lo, hi = paired_diff_ci([0, 0, 1, 1], [1, 1, 1, 1])
    assert m == 0.5 and lo <= 0.5 <= hi


def test_bad_arguments(sft, tmp_path):
    for extra, msg in ((["--tasks", "poetry"], "--tasks"), (["--group", "1"], "--group"),
                       (["--difficulty", "4"], "--difficulty"), (["--icepop", "2", "5"], "--icepop"),
                       (["--overlong-buffer", "10"], "--overlong-buffer")):
        with pytest.raises(Exception, match=msg):
            _run(sft, tmp_path / "x", *extra)


def test_an_update_moves_probability_toward_the_rewarded_reply(sft):
    """The sign of the whole step: after one AdamW step on a group [rewarded, unrewarded], the
    rewarded reply is more likely and the other less likely than before."""
    d, tok = sft
    model = load_pretrained(d, dtype=torch.float32).train()
    prompt = tok.encode("<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    good, bad = tok.encode("The answer is 7.<|im_end|>"), tok.encode("def add(a, b):<|im_end|>")
    adv = loo_advantages([1.0, 0.0]).tolist()
    rows = [{"ids": prompt + r, "start": len(prompt), "logp_infer": [0.0] * len(r), "adv": a} for r, a in zip((good, bad), adv)]
    old, _, _ = rl.old_logprobs(model, rows, 2)
    for r, o in zip(rows, old):
        r["logp_infer"] = o.tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = rl.build_parser().parse_args(["--from", "x", "--out", "y"])
    st = rl.train_minibatch(model, opt, rows, old, 2, args)
    assert st["tokens"] == len(good) + len(bad) and st["icepop_masked"] == 0 and st["clipped"] == 0
    new, _, _ = rl.old_logprobs(model, rows, 2)
    assert new[0].sum() > old[0].sum() + 0.1 and new[1].sum() < old[1].sum() - 0.1


def test_time_limit_stops_the_loop_and_still_evaluates(sft, tmp_path):
    out = tmp_path / "t"
    _run(sft, out, "--time-limit", "1e-6")  # the first step always runs, then none fits
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 1 and s["after"]["step"] == 1 and ckpt.latest(out).name == "step_00000001"
