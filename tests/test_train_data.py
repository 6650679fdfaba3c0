"""The trainer on the real curriculum loader (mellum2.data.loader.Loader) over a small prepared corpus:
phases, exact resume through the loader's own state, the tokenizer in the run directory, samples."""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from mellum2.data.prepare import prepare
from mellum2.train import pretrain
from mellum2.train.errors import TrainError
from test_train_utils import one_thread  # noqa: F401 - fixture

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Loader.*renormalised:UserWarning")]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "code").mkdir()
    for m in ("textwrap.py", "string.py", "fnmatch.py", "bisect.py", "heapq.py", "shlex.py", "glob.py", "csv.py"):
        shutil.copy(STDLIB / m, root / "code" / m)
    out = root / "prepared"
    prepare([f"code:{root / 'code'}", "embedded:math"], out, vocab_size=320, scale=0.002, progress=False,
            log=lambda s: None)
    return out


def _run(data_dir, out, *extra):
    return pretrain.run(["--preset", "test-small2", "--data", str(data_dir), "--out", str(out), "--max-steps", "10",
                         "--batch-size", "2", "--seq-len", "64", "--save-every", "5", "--log-every", "2",
                         "--no-progress", "--no-tensorboard", "--peak-tflops", "1", *extra])


def _recs(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_real_loader_run_resumes_exactly(data_dir, tmp_path):
    out = _run(data_dir, tmp_path / "a", "--samples", "4")
    recs = _recs(out)
    assert [r["step"] for r in recs] == list(range(1, 11))
    assert [r["phase"] for r in recs] == [0] * 6 + [1] * 3 + [2]  # 58/26/16% of 10 steps, by tokens
    assert (out / "tokenizer" / "tokenizer.json").is_file()  # inference finds it next to the checkpoints
    assert (out / "samples.txt").read_text().count("--- prompt") == 4
    again = tmp_path / "b"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step_00000010")
    _run(data_dir, again, "--samples", "0", "--resume")
    assert [(r["loss"], r["grad_norm"]) for r in _recs(again)] == [(r["loss"], r["grad_norm"]) for r in recs]


def test_tokenizer_larger_than_the_model_vocab_is_an_error(data_dir, tmp_path):
    with pytest.raises(TrainError, match="320 tokens but the model's vocab_size is 256"):
        pretrain.run(["--preset", "test-small", "--data", str(data_dir), "--out", str(tmp_path / "o"),
                      "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress"])
