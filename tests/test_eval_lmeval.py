"""lm-evaluation-harness: the `mellum2` model class computes what the model says (checked against a
plain full forward), batching changes nothing, and `lm_eval --model mellum2` runs offline on tasks
defined from local files (tests/fixtures/lmeval), through the import hook and through `mellum2 eval lm-eval`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.tokenizer import train_bpe

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from mellum2.eval import lmeval_hook  # noqa: E402
from mellum2.eval.lmeval import Mellum2LM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FIX = Path(__file__).parent / "fixtures" / "lmeval"
ROOT = Path(__file__).parent.parent
TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
         "class Foo:\n    pass\n", "import os\nimport sys\n"] * 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "model"
    tok = train_bpe(TEXTS, 320)
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small", vocab_size=320)).eval()
    m.save_pretrained(d)
    tok.save(d)
    return d, m, tok


def req(kind, *args):
    return Instance(kind, {}, tuple(args), 0)


def logprob(m, ids, n):
    """Sum of log p of the last n ids, from one full forward."""
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)
    return sum(lp[i - 1, ids[i]].item() for i in range(len(ids) - n, len(ids)))


def test_loglikelihood_is_the_models(ckpt):
    d, m, tok = ckpt
    lm = Mellum2LM(pretrained=str(d), batch_size=2)
    reqs = [("def add(a, b):\n    return a", " + b"), ("import", " os"), ("for i in ", "range(10)"), ("", "class Foo")]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in reqs])
    for (c, x), (ll, greedy) in zip(reqs, got):
        ctx = [tok.bos_id] + tok.encode(c.rstrip(" "), allow_special=False)
        whole = [tok.bos_id] + tok.encode(c + x, allow_special=False)
        assert whole[:len(ctx)] == ctx
        assert ll == pytest.approx(logprob(m, whole, len(whole) - len(ctx)), abs=1e-4)
        assert isinstance(greedy, bool)
    one = Mellum2LM(pretrained=str(d), batch_size=1).loglikelihood([req("loglikelihood", c, x) for c, x in reqs])
    assert [a for a, _ in one] == pytest.approx([a for a, _ in got], abs=1e-4)


def test_rolling_and_generate(ckpt):
    d, m, tok = ckpt
    lm = Mellum2LM(pretrained=str(d))
    text = "def add(a, b):\n    return a + b\n"
    ids = [tok.bos_id] + tok.encode(text, allow_special=False)
    (ll,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert ll == pytest.approx(logprob(m, ids, len(ids) - 1), abs=1e-3)
    outs = lm.generate_until([req("generate_until", "def add", {"until": ["\n"], "max_gen_toks": 6}),
                              req("generate_until", "import", {"until": [], "max_gen_toks": 4})])
    assert len(outs) == 2 and "\n" not in outs[0]
    prompt = [tok.bos_id] + tok.encode("import", allow_special=False)
    with torch.no_grad():
        x = list(prompt)
        for _ in range(4):
            x.append(int(m(torch.tensor([x])).logits[0, -1].argmax()))
    new = [t for t in x[len(prompt):]]
    if tok.eot_id not in new and tok.eos_id not in new:
        assert outs[1] == tok.decode(new)


def _run_lm_eval(args, cwd, env_extra=None, pre=""):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    code = pre + "import sys\nfrom lm_eval.__main__ import cli_evaluate\nsys.argv = ['lm_eval'] + sys.argv[1:]\ncli_evaluate()\n"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_hook_registers_lazily(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    lmeval_hook.write_pth(str(site))
    code = (f"import site, sys; site.addsitedir({str(site)!r})\n"
            "from lm_eval.api.registry import model_registry, get_model\n"
            "assert 'mellum2' in model_registry and 'hf' in model_registry, list(model_registry)\n"
            "assert 'torch' not in sys.modules and 'mellum2' not in sys.modules  # lazy\n"
            "print(get_model('mellum2').__module__)\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "mellum2.eval.lmeval"


@pytest.mark.slow
def test_lm_eval_cli_through_the_import_hook(ckpt, tmp_path):
    d, _, _ = ckpt
    site = tmp_path / "site"
    site.mkdir()
    lmeval_hook.write_pth(str(site))
    out = tmp_path / "out"
    # the interpreter reads the .pth as it would in the environment's site-packages
    r = _run_lm_eval(["--model", "mellum2", "--model_args", f"pretrained={d}", "--tasks",
                      "mellum2_tiny_mc,mellum2_tiny_gen,mellum2_tiny_ppl", "--include_path", str(FIX),
                      "--output_path", str(out), "--batch_size", "2"], cwd=FIX,
                     pre=f"import site; site.addsitedir({str(site)!r})\n")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert 0.0 <= res["mellum2_tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in res["mellum2_tiny_gen"]
    assert math.isfinite(res["mellum2_tiny_ppl"]["bits_per_byte,none"])
    # without the hook the model is unknown to lm_eval
    bad = _run_lm_eval(["--model", "mellum2", "--model_args", f"pretrained={d}", "--tasks", "mellum2_tiny_mc",
                        "--include_path", str(FIX)], cwd=FIX)
    assert bad.returncode != 0


@pytest.mark.slow
def test_mellum2_eval_lm_eval(ckpt, tmp_path):
    d, _, _ = ckpt
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mellum2.cli", "eval", "lm-eval", "--model_args", f"pretrained={d}",
                        "--tasks", "mellum2_tiny_mc", "--include_path", str(FIX), "--limit", "2"],
                       cwd=FIX, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mellum2_tiny_mc" in r.stdout
