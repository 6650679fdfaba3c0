"""Sources: directories/globs/JSONL/Parquet/HF specs with domain tags, bad input, the embedded corpus
(domains, metadata, determinism of the math generator and correctness of its answers)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from fractions import Fraction

import pytest

from mellum2.data import embedded, mathgen
from mellum2.data.sources import (Document, SourceError, iter_files, iter_jsonl, iter_parquet, iter_source,
                                  language_of, parse_spec)


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("print('a')\n")
    (tmp_path / "pkg" / "sub" / "b.c").write_text("int main(void) { return 0; }\n")
    (tmp_path / "README.md").write_text("Some prose about the project.\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "image.py").write_bytes(b"x = 1\x00\x00")  # NUL bytes: binary, skipped
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: skipped
    return tmp_path


def test_directory_walk_tags_domain_language_group(tree):
    docs = {d.source.split("/")[-1]: d for d in iter_files(tree)}
    assert set(docs) == {"a.py", "b.c", "README.md"}
    assert (docs["a.py"].domain, docs["a.py"].lang) == ("code", "python")
    assert (docs["b.c"].domain, docs["b.c"].lang) == ("code", "c")
    assert (docs["README.md"].domain, docs["README.md"].lang) == ("web", "")
    assert docs["b.c"].group == f"{tree.name}/pkg" and docs["a.py"].group == f"{tree.name}/pkg"
    assert docs["README.md"].text == "Some prose about the project.\n"
    forced = list(iter_source(f"web:{tree}/pkg"))
    assert {d.domain for d in forced} == {"web"} and len(forced) == 2


def test_glob_spec(tree):
    docs = list(iter_source(f"code:{tree}/**/*.c"))
    assert [d.source.split("/")[-1] for d in docs] == ["b.c"] and docs[0].lang == "c"
    with pytest.raises(SourceError, match="matches no file"):
        list(iter_source(f"{tree}/**/*.rs"))


def test_jsonl(tmp_path):
    rows = [{"text": "def f(): pass", "domain": "code", "lang": "python", "path": "f.py", "repo": "r1"},
            {"text": "plain prose"}, {"content": "x"}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n")
    docs = list(iter_source(str(p)))
    assert [d.domain for d in docs] == ["code", "web"]
    assert (docs[0].lang, docs[0].source, docs[0].group) == ("python", "f.py", "r1")
    assert [d.domain for d in iter_source(f"math:{p}")] == ["math", "math"]
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert [d.text for d in iter_jsonl(gz)] == ["def f(): pass", "plain prose"]
    p.write_text('{"text": "lone \\ud800 surrogate"}\n')
    assert [d.text for d in iter_jsonl(p)] == ["lone ? surrogate"]  # tokenizable
    p.write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(SourceError, match=r"d\.jsonl:1: no text field 'text'"):
        list(iter_jsonl(p))
    assert [d.text for d in iter_jsonl(p, text_field="content")] == ["x"]
    p.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(SourceError, match=r"d\.jsonl:2: not a JSON line"):
        list(iter_jsonl(p))
    p.write_text('{"text": "ok", "domain": "poetry"}\n')
    with pytest.raises(SourceError, match="domain must be one of"):
        list(iter_jsonl(p))


def test_parquet(tmp_path):
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(SourceError, match="needs pyarrow"):
            list(iter_parquet(tmp_path / "x.parquet"))
        pytest.skip("pyarrow not installed: only the clear error is tested")
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a b c", "int x;"], "domain": ["web", "code"]}), p)
    assert [(d.text, d.domain) for d in iter_source(str(p))] == [("a b c", "web"), ("int x;", "code")]


def test_hf_without_datasets_is_a_clear_error():
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed; streaming needs the network, not tested here")
    with pytest.raises(SourceError, match="needs the `datasets` package"):
        list(iter_source("code:hf:bigcode/the-stack-smol"))


def test_bad_specs(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list(iter_source(str(tmp_path / "missing")))
    with pytest.raises(SourceError, match="nothing after"):
        parse_spec("code:")
    with pytest.raises(SourceError, match="non-empty"):
        parse_spec("")
    with pytest.raises(SourceError, match="domain must be one of"):
        list(iter_source("embedded:poetry"))
    assert parse_spec("code:src") == ("code", "src") and parse_spec("src") == (None, "src")
    assert language_of("x.PY") == "python" and language_of("x.unknown") == ""


def test_embedded_corpus_has_all_domains_with_metadata():
    docs = list(iter_source("embedded", embedded_scale=0.005))
    by = {d: [x for x in docs if x.domain == d] for d in ("web", "code", "math")}
    assert all(by.values()), {d: len(v) for d, v in by.items()}
    assert all(isinstance(x, Document) and x.text and x.source and x.group for x in docs)
    assert {x.lang for x in by["code"]} >= {"python"}
    assert all(x.lang == "" for x in by["web"] + by["math"])
    py = [x for x in by["code"] if x.lang == "python"]
    assert py[0].source.endswith(".py") and py[0].group.startswith("python3")
    only_math = list(iter_source("embedded:math", embedded_scale=0.001))
    assert only_math and {x.domain for x in only_math} == {"math"}


def test_man_and_html_to_text():
    troff = ('.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH SYNOPSIS\n.B ls\n'
             '[\\fIOPTION\\fR]... [\\fIFILE\\fR]...\n.PP\nList information about the FILEs.\n.BR ls (1)\n')
    text = embedded.man_to_text(troff)
    assert "NAME" in text and "ls - list directory contents" in text and "[OPTION]... [FILE]..." in text
    assert "\\f" not in text and "comment" not in text and "ls(1)" in text
    assert embedded.html_to_text("<html><style>x{}</style><p>A &amp; B</p></html>") == "A & B\n"


def test_mathgen_is_deterministic_and_varied():
    a = [t for _, t in mathgen.generate(seed=3, max_bytes=20_000)]
    b = [t for _, t in mathgen.generate(seed=3, max_bytes=20_000)]
    c = [t for _, t in mathgen.generate(seed=4, max_bytes=20_000)]
    assert a == b and a != c
    assert sum(map(len, a)) >= 20_000 and len(set(a)) == len(a)
    assert mathgen.worksheet(3, 7) == a[7]


def _eval(expr: str, x: int) -> int:
    """'3x^2 - x + 2' at x (implicit multiplication, ^ as power)."""
    return eval(re.sub(r"(\d)x", r"\1*x", expr).replace("^", "**"), {"x": x})


def test_mathgen_answers_are_correct():
    r = random.Random(0)
    for _ in range(200):
        q, steps, ans = mathgen.addition(r)
        x, y = map(int, re.findall(r"\d+", q))
        assert int(ans) == x + y
        q, steps, ans = mathgen.linear(r)
        lhs, rhs = re.match(r"Solve for x: (.*) = (-?\d+)\.$", q).groups()
        assert _eval(lhs, int(ans.split("= ")[1])) == int(rhs), (q, ans)
        q, steps, ans = mathgen.fractions(r)
        a, b, op, c, d = re.match(r"Simplify (\d+)/(\d+) ([+-]) (\d+)/(\d+)", q).groups()
        want = Fraction(int(a), int(b)) + (1 if op == "+" else -1) * Fraction(int(c), int(d))
        assert Fraction(ans) == want
        q, steps, ans = mathgen.quadratic(r)
        poly = re.match(r"Find the roots of (.*) = 0\.$", q).group(1)
        for root in re.findall(r"x = (-?\d+)", ans):
            assert _eval(poly, int(root)) == 0, (q, ans)
        q, steps, ans = mathgen.system(r)
        e1, c1, e2, c2 = re.match(r"Solve the system: (.*) = (-?\d+) and (.*) = (-?\d+)\.$", q).groups()
        x, y = map(int, re.findall(r"-?\d+", ans))
        for e, c in ((e1, c1), (e2, c2)):
            assert eval(re.sub(r"(\d)([xy])", r"\1*\2", e), {"x": x, "y": y}) == int(c), (q, ans)
