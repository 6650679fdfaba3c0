"""`mellum2 sft`: it trains (the loss falls), packs best-fit without truncating, keeps documents of a row
apart, resumes exactly, handles bad input with clear errors or counted skips, and its output directory
is a model that `mellum2 chat`, `load_pretrained` and transformers load."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mellum2 import Mellum2, ModelConfig, load_pretrained
from mellum2.posttrain import sft_examples
from mellum2.posttrain.formats import DataFormatError
from mellum2.posttrain.sft import SFTError, run
from mellum2.posttrain.sftpack import IGNORE, SFTLoader, build_row, pack_epoch
from mellum2.tokenizer import Tokenizer, train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "add two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                                            "b": {"type": "integer"}}}}}]


def conversations(n: int = 24) -> list[dict]:
    """Short, learnable conversations: greetings, sums answered directly, and a tool call."""
    out = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        if i % 6 in (0, 3):
            out.append({"messages": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello! I am Mellum.",
                                      "reasoning_content": "A greeting."}]})
        elif i % 6 != 5:
            out.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                     {"role": "assistant", "content": f"The answer is {a + b}.",
                                      "reasoning_content": f"{a} plus {b}."}]})
        else:
            call = {"id": "c0", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}
            out.append({"tools": TOOLS, "messages": [
                {"role": "user", "content": f"Add {a} and {b}."},
                {"role": "assistant", "content": "", "tool_calls": [call], "reasoning_content": "Use the tool."},
                {"role": "tool", "tool_call_id": "c0", "content": json.dumps({"result": a + b})},
                {"role": "assistant", "content": f"It is {a + b}.", "reasoning_content": "Report it."}]})
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random test-small model with a small BPE tokenizer, saved as a checkpoint directory."""
    d = tmp_path_factory.mktemp("base") / "model"
    from mellum2.chat import render

    texts = [render(c["messages"], c.get("tools")) for c in conversations()] * 4
    tok = train_bpe(texts, 384)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("test-small", vocab_size=384, max_position_embeddings=512, eos_token_id=28)
    Mellum2(cfg).save_pretrained(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl", conversations())


def args(base, data, out, *extra):
    return ["--from", str(base), "--data", str(data), "--out", str(out), "--seq-len", "384", "--batch-size", "2",
            "--lr", "3e-3", "--no-progress", "--no-tensorboard", "--peak-tflops", "1", "--log-every", "1", *extra]


def losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["phase"])
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


# ---------------------------------------------------------------------------- training, output
EPOCHS = 6


@pytest.fixture(scope="module", params=["instruct", "thinking"])
def trained(request, base, data, tmp_path_factory):
    mode = request.param
    return mode, run(args(base, data, tmp_path_factory.mktemp(mode) / "out", "--mode", mode, "--epochs", str(EPOCHS)))


def test_sft_learns_and_writes_a_loadable_model(trained):
    mode, out = trained
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == json.loads((out / "summary.json").read_text())["steps"] > 10
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert all(r["mtp"] > 0 for r in recs)  # the MTP head trains too
    assert {r["phase"] for r in recs} == set(range(EPOCHS))  # the epoch is logged as the phase
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "loss.png", "args.json", "tokenizer/tokenizer.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["router_aux_loss_coef"] == 1e-4 and cfg["num_nextn_predict_layers"] == 1
    # the export is the last checkpoint's model
    last_ckpt = sorted((out / "checkpoints").glob("step_*"))[-1] / "model" / "model.safetensors"
    a, b = load_file(out / "model.safetensors"), load_file(last_ckpt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = load_pretrained(out)
    tok = Tokenizer.load(out)
    # the fine-tuned model answers in its variant's format: greedy reply to a training prompt
    from mellum2.chat import parse, render
    from mellum2.infer import Engine, SamplingParams

    prompt = tok.encode(render([{"role": "user", "content": "Hi"}], add_generation_prompt=True))
    r = Engine(m).generate([prompt], SamplingParams(max_new_tokens=40, stop_token_ids=(tok.eos_id,)))[0]
    text = tok.decode(r.tokens)
    msg = parse(text)  # a few steps on 24 conversations teach the format's opening, not yet every reply's end
    assert text.startswith("<think>") == (mode == "thinking"), text
    assert bool(msg["reasoning_content"]) == (mode == "thinking") and not msg["errors"], text


def test_output_loads_in_chat_and_transformers(trained):
    _, out = trained
    from mellum2.chat import cli

    import io
    chat = cli.open_chat(cli.build_parser().parse_args(["--model", str(out), "--temperature", "0",
                                                        "--max-new-tokens", "5"]), out=io.StringIO(), err=io.StringIO())
    assert chat.say("Hi") is not None
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    msgs = conversations()[5]["messages"]
    from mellum2.chat import render

    assert tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False) == render(msgs, TOOLS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_pretrained(out).eval()
    ids = torch.tensor([Tokenizer.load(out).encode(render(msgs, TOOLS))])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), ours(ids).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- packing
def test_best_fit_packing_drops_long_examples_and_never_truncates():
    lengths = [7, 5, 4, 3, 3, 3, 12, 9, 2]  # 12 and 9 do not fit in 8; 2 has no label after the first two
    examples = [(list(range(1, n + 1)), list(range(1, n + 1))) for n in lengths]
    ld = SFTLoader(examples, seq_len=8, batch_size=1, epochs=2, pad_id=0, seed=3)
    assert ld.dropped == 2 and ld.unlabelled == 1 and len(ld.examples) == 6
    per_epoch = ld.epoch_rows
    assert sum(per_epoch) == len(ld.rows)
    start = 0
    for n in per_epoch:
        rows = ld.rows[start:start + n]
        start += n
        placed = sorted(i for r in rows for i in r)
        assert placed == list(range(6))  # each example exactly once per epoch, whole
        assert all(sum(len(ld.examples[i][0]) for i in r) <= 8 for r in rows)
        assert n == 4  # 25 tokens in rows of 8: best fit reaches the minimum, 4 rows (7, 5+3, 4+3, 3)
    # every row's tokens are its examples' tokens, in full, then padding
    b = next(iter(ld))
    ids, lab, pos = b["input_ids"][0].tolist(), b["labels"][0].tolist(), b["position_ids"][0].tolist()
    used = sum(len(ld.examples[i][0]) for i in ld.rows[0])
    assert ids[used:] == [0] * (8 - used) and lab[used:] == [IGNORE] * (8 - used)


def test_best_fit_takes_the_largest_that_fits():
    # one buffer of everything: the row takes 6, then the largest that fits the 4 left (3), then 1
    rows = pack_epoch([6, 3, 1, 5, 2], seq_len=10, seed=0, epoch=0)
    assert sorted(sorted([6, 3, 1, 5, 2][i] for i in r) for r in rows) == [[1, 3, 6], [2, 5]]


def test_row_layout_masks_the_first_labels_of_each_document():
    ex = [([5, 6, 7, 8], [5, 6, 7, 8]), ([9, 10, 11], [IGNORE, 10, 11])]
    ids, lab, pos = build_row(ex, [0, 1], 10, pad_id=2)
    assert ids == [5, 6, 7, 8, 9, 10, 11, 2, 2, 2]
    assert lab == [IGNORE, IGNORE, 7, 8, IGNORE, IGNORE, 11, IGNORE, IGNORE, IGNORE]
    assert pos == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]


def test_packed_documents_do_not_attend_to_each_other(base):
    """The logits (and MTP logits) of a document are the same packed with others as alone."""
    tok = Tokenizer.load(base)
    m = load_pretrained(base).eval()
    convs = conversations()
    ex = [sft_examples(tok, c["messages"], "instruct", c.get("tools"))[0] for c in convs[:3]]
    ids, _, pos = build_row(ex, [0, 1, 2], 480, tok.pad_id)
    with torch.no_grad():
        packed = m(torch.tensor([ids]), position_ids=torch.tensor([pos]), mtp=True)
        start = 0
        for x, _ in ex:
            alone = m(torch.tensor([x]), mtp=True)
            sl = slice(start, start + len(x))
            torch.testing.assert_close(packed.logits[0, sl], alone.logits[0], rtol=1e-5, atol=1e-5)
            n = len(x) - 1  # MTP logits exist for positions 0..T-2 of each document
            torch.testing.assert_close(packed.mtp_logits[0, start:start + n], alone.mtp_logits[0], rtol=1e-5, atol=1e-5)
            start += len(x)
    # and without the position restarts the documents do see each other (the test can fail)
    with torch.no_grad():
        flat = m(torch.tensor([ids]))
    x1 = len(ex[0][0])
    assert not torch.allclose(flat.logits[0, x1:x1 + 5], packed.logits[0, x1:x1 + 5], atol=1e-3)


def test_loader_splits_rows_over_ranks_like_one_process():
    examples = [([1] * n, [1] * n) for n in (5, 3, 7, 2, 6, 4, 8, 1, 3, 5)]
    one = SFTLoader(examples, seq_len=10, batch_size=2, epochs=2, seed=1)
    ranks = [SFTLoader(examples, seq_len=10, batch_size=1, epochs=2, seed=1, rank=k, world_size=2) for k in (0, 1)]
    assert one.steps == ranks[0].steps
    for b in one:
        parts = [next(r) for r in ranks]
        assert torch.equal(b["input_ids"], torch.cat([p["input_ids"] for p in parts]))


# ---------------------------------------------------------------------------- resume
def test_resume_is_exact(base, data, tmp_path):
    ref = run(args(base, data, tmp_path / "ref", "--epochs", "3", "--save-every", "3", "--keep", "10"))
    steps = json.loads((ref / "summary.json").read_text())["steps"]
    assert steps > 6
    part = tmp_path / "part"
    shutil.copytree(ref, part)
    for c in sorted((part / "checkpoints").glob("step_*"))[1:]:  # back to the first checkpoint (step 3)
        shutil.rmtree(c)
    for f in ("config.json", "model.safetensors", "summary.json"):
        (part / f).unlink()
    run(args(base, data, part, "--epochs", "3", "--save-every", "3", "--keep", "10", "--resume"))
    assert losses(part) == losses(ref)  # every step's loss and grad norm, as exact floats
    a, b = load_file(ref / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(base, data, tmp_path):
    out = run(args(base, data, tmp_path / "o", "--epochs", "1", "--max-steps", "2"))
    (out / "config.json").unlink()
    with pytest.raises(Exception, match="cannot resume exactly"):
        run(args(base, data, out, "--epochs", "1", "--max-steps", "2", "--lr", "1e-3", "--resume"))
    with pytest.raises(SFTError, match="already holds checkpoints"):
        run(args(base, data, out, "--epochs", "1"))


# ---------------------------------------------------------------------------- bad input
BAD = {
    "malformed JSON": ('{"messages": [', r"bad\.jsonl:3: "),
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     r"bad\.jsonl:3: .*unknown role 'robot'"),
    "arguments not an object": (
        {"messages": [{"role": "user", "content": "x"},
                      {"role": "assistant", "content": "", "tool_calls": [
                          {"type": "function", "function": {"name": "add", "arguments": "[1, 2]"}}]},
                      {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3"}]},
        r"bad\.jsonl:3: messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_rows_stop_with_file_and_line_before_anything_is_written(base, tmp_path, kind):
    row, match = BAD[kind]
    bad = write_jsonl(tmp_path / "bad.jsonl", [*conversations(2), row, *conversations(3)])
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match=match):
        run(args(base, bad, out, "--epochs", "1"))
    assert not out.exists()  # nothing half written
    out = run(args(base, bad, tmp_path / "skip", "--epochs", "1", "--on-error", "skip"))
    assert (out / "config.json").is_file()
    counts = json.loads((out / "summary.json").read_text())["data"]
    assert counts["conversations"] == 5


def test_skipped_rows_are_counted(base, tmp_path):
    rows = [*conversations(4), "not json", {"messages": [{"role": "robot", "content": "x"}]}]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = run(args(base, bad, tmp_path / "o", "--epochs", "1", "--on-error", "skip"))
    a = json.loads((out / "args.json").read_text())
    assert a["data_counts"]["conversations"] == 4


def test_conversations_longer_than_seq_len_are_dropped_and_counted(base, tmp_path):
    long = {"messages": [{"role": "user", "content": "Tell me. " * 60}, {"role": "assistant", "content": "No."}]}
    bad = write_jsonl(tmp_path / "long.jsonl", [*conversations(6), long, long])
    out = run(args(base, bad, tmp_path / "o", "--epochs", "1", "--seq-len", "96"))
    counts = json.loads((out / "summary.json").read_text())["data"]
    assert counts["dropped_too_long"] >= 2
    assert {"long.jsonl:7", "long.jsonl:8"} <= {s.rsplit("/", 1)[-1] for s in counts["dropped_first"]}
    only_long = write_jsonl(tmp_path / "only.jsonl", [long])
    with pytest.raises(SFTError, match="no example fits in --seq-len 96"):
        run(args(base, only_long, tmp_path / "o2", "--epochs", "1", "--seq-len", "96"))
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------- the command line
def test_cli(base, data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mellum2.cli", "sft"]
    r = subprocess.run(cmd + ["--help"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--mode" in r.stdout and "--on-error" in r.stdout
    r = subprocess.run(cmd + args(tmp_path / "nothing", data, tmp_path / "o"), env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("mellum2 sft: error: --from ") and "Traceback" not in r.stderr
    r = subprocess.run(cmd + args(base, data, tmp_path / "o", "--epochs", "1", "--max-steps", "2", "--mode", "thinking"),
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "saved the thinking model" in r.stdout and (tmp_path / "o" / "config.json").is_file()


def test_demo_chat_step_runs(trained, capsys):
    """The demo's last step (one chat turn, one tool call through `mellum2 chat`'s Chat) on a fine-tuned model."""
    mode, out = trained
    if mode != "instruct":
        pytest.skip("the demo fine-tunes the Instruct variant")
    from mellum2 import demo

    r = demo.step_chat(out)
    shown = capsys.readouterr().out
    assert "> Who are you?" in shown and "> What is 37 * 43? Use the calculator." in shown
    assert isinstance(r["tool_calls"], list) and isinstance(r["identity"], str)


def test_chat_evaluation_scores_greedy_replies(trained):
    """chateval.evaluate: the replies are plain greedy decoding of the rendered prompts, and the rates are
    the checks applied to them."""
    mode, out = trained
    from mellum2.chat import parse, render
    from mellum2.posttrain.chateval import evaluate, think_ok

    items = [{"id": "a", "kind": "identity", "messages": [{"role": "user", "content": "Hi"}],
              "expect": {"keyword": "Mellum"}},
             {"id": "b", "kind": "tool", "tools": TOOLS, "messages": [{"role": "user", "content": "Add 2 and 3."}],
              "expect": {"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}], "match": {}}}]
    r = evaluate(str(out), items=items, think=mode == "thinking", max_new_tokens=24, keep_replies=True)
    m, tok = load_pretrained(out).eval(), Tokenizer.load(out)
    stops = {tok.eos_id, tok.eot_id, tok.im_start_id}
    wf, thinks = [], []
    for it, rep in zip(items, r["replies"]):
        ids = tok.encode(render(it["messages"], it.get("tools"), add_generation_prompt=True))
        new = []
        with torch.no_grad():
            for _ in range(24):
                t = int(m(torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(t)
                if t in stops:
                    break
        assert rep["reply"] == tok.decode(new)
        wf.append(rep["reply"].endswith("<|im_end|>") and not parse(rep["reply"])["errors"])
        thinks.append(think_ok(rep["reply"], parse(rep["reply"])))
    assert r["well_formed"] == sum(wf) / 2 and r["prompts"] == 2
    assert r["think_ok"] == (sum(thinks) / 2 if mode == "thinking" else None)
    assert r["identity"] == float("Mellum" in (parse(r["replies"][0]["reply"])["content"] or ""))


def test_think_ok():
    from mellum2.chat import parse
    from mellum2.posttrain.chateval import think_ok

    for text, want in (("<think>\nsum\n</think>\n\nThe answer is 4.<|im_end|>", True),
                       ("<think>\nsum\n</think>\n\n<tool_call>\n{\"name\": \"add\", \"arguments\": {}}\n</tool_call><|im_end|>", True),
                       ("The answer is 4.<|im_end|>", False), ("<think>\nsum, and no end", False),
                       ("<think>\nsum\n</think>\n\n<|im_end|>", False)):
        assert think_ok(text, parse(text)) == want, text
