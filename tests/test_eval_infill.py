"""HumanEval infilling: the paper's task counts, canonical middles pass and match exactly, wrong ones
fail; repository completion: Levenshtein, task selection, and both modes end to end on a tiny model."""
import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.eval import completion, gen, humaneval, infill
from mellum2.tokenizer import train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problems():
    return humaneval.read_problems()


@pytest.fixture(scope="module")
def tiny(problems):
    tok = train_bpe([p["prompt"] + p["canonical_solution"] for p in problems.values()], 400)
    torch.manual_seed(0)
    return Mellum2(ModelConfig.from_preset("test-small", vocab_size=400, max_position_embeddings=512)).eval(), tok


def test_task_counts_are_the_papers(problems):
    assert infill.counts(problems) == infill.PAPER_COUNTS == {"single-line": 1033, "multi-line": 5815,
                                                               "random-span": 1640}


@pytest.mark.parametrize("mode", infill.MODES)
def test_tasks_reassemble_the_solution(problems, mode):
    for t in infill.tasks(problems, mode)[:200]:
        p = t["problem"]
        assert t["prefix"] + t["middle"] + t["suffix"] == p["prompt"] + p["canonical_solution"]
        if mode != "random-span":
            assert t["middle"].strip() and t["middle"].endswith("\n")
    assert infill.tasks(problems, mode) == infill.tasks(problems, mode)  # deterministic


def test_canonical_middles_pass_and_wrong_ones_fail(problems):
    ts = infill.subset(infill.tasks(problems, "single-line"), 6) + infill.subset(infill.tasks(problems, "multi-line"), 6)
    right = infill.score(ts, [t["middle"] for t in ts], "multi-line", timeout=2.0, workers=2)
    assert right["pass@1"] == 1.0 and right["exact_match"] == 1.0
    wrong = infill.score(ts, ["    raise ValueError\n"] * len(ts), "multi-line", timeout=2.0, workers=2)
    assert wrong["pass@1"] == 0.0 and wrong["exact_match"] == 0.0
    # single-line scoring keeps the first line only: a right line followed by junk still passes
    one = [t for t in infill.tasks(problems, "single-line") if t["task_id"].startswith("HumanEval/0/")]
    res = infill.score(one, [t["middle"] + "junk(\n" for t in one], "single-line", timeout=2.0, workers=2)
    assert res["pass@1"] == 1.0


def test_infill_run_on_a_tiny_model(tiny):
    m, tok = tiny
    res = infill.run(m, tok, modes=("single-line",), limit=3, max_new_tokens=8, timeout=2.0, workers=2, quiet=True)
    r = res["modes"]["single-line"]
    assert r["tasks"] == 3 and 0.0 <= r["pass@1"] <= 1.0 and len(r["results"]) == 3


def test_fim_batch_is_the_single_prompt_greedy(tiny):
    m, tok = tiny
    pairs = [("def f(x):\n", "    return y\n"), ("import os\n\n\ndef g(", "):\n    pass\n")]
    batched = gen.fim(m, tok, pairs, context=64, max_new_tokens=6, quiet=True)
    single = [gen.fim(m, tok, [p], context=64, max_new_tokens=6, quiet=True)[0] for p in pairs]
    assert batched == single
    prompt = gen.fim_prompt(tok, "a" * 400, "b" * 400, context=40)
    assert len(prompt) == 40 + 4 and prompt[1] == tok.fim_prefix_id


@pytest.mark.parametrize("a,b,d", [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
                                   ("x = 1", "x = 1", 0)])
def test_levenshtein(a, b, d):
    assert completion.levenshtein(a, b) == completion.levenshtein(b, a) == d


def test_completion_tasks_and_scores(tmp_path, tiny):
    src = tmp_path / "a.py"
    src.write_text("import os\n\n\ndef f(x):\n    # a comment\n    y = x + 1\n    return y\n\n\nprint(f(2))\n")
    ts = completion.tasks([src], lines_per_file=5)
    assert [t["truth"] for t in ts] == ["def f(x):", "    y = x + 1", "    return y", "print(f(2))"]
    assert all(t["prefix"].endswith("\n") for t in ts)
    s = completion.score(ts, [t["truth"] + "\nmore" for t in ts])
    assert s["exact_match"] == 1.0 and s["edit_similarity"] == 1.0
    s = completion.score(ts, ["def f(y):", "", "    return y", "print(f(3))"])
    assert s["exact_match"] == 0.25
    m, tok = tiny
    res = completion.run(m, tok, files=[src], lines_per_file=2, contexts=(16, 64), max_new_tokens=6, quiet=True)
    assert [(r["mode"], r["context"]) for r in res["rows"]] == [("fim", 16), ("ltr", 16), ("fim", 64), ("ltr", 64)]
