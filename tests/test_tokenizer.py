"""Tokenizer: special-token ids, lossless round trip (property tests), digit splitting, compact
indentation, equality with transformers' AutoTokenizer (every special token included), bad input, CLI."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mellum2.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, train_bpe
from mellum2.cli import main as mellum2_cli
from mellum2.tokenizer.cli import main as tok_cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap.py", "string.py", "fnmatch.py", "bisect.py", "heapq.py", "shlex.py", "glob.py", "colorsys.py",
           "json/encoder.py", "json/decoder.py", "argparse.py", "dataclasses.py"]
PROSE = ("The quick brown fox jumps over the lazy dog. Tokenizers turn text into integers; a good one "
         "compresses code and prose alike. Numbers such as 1234 and 3.14159 are split into digits. ")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def corpus() -> list[str]:
    texts = [(STDLIB / m).read_text(encoding="utf-8") for m in MODULES]
    texts += [PROSE * 3, "Problem 1. Compute 12 + 30.\nSolution.\n12 + 30 = 42.\nAnswer: 42\n"] * 20
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(corpus(), vocab_size=2048)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tok.save(tmp_path_factory.mktemp("tok"))
    return transformers.AutoTokenizer.from_pretrained(str(d))


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 2048
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (0, 28, 0, 4)
    assert (tok.im_start_id, tok.im_end_id, tok.think_id, tok.think_end_id) == (27, 28, 23, 24)
    assert (tok.tool_call_id, tok.tool_call_end_id, tok.tool_response_id, tok.tool_response_end_id) == (29, 30, 31, 32)
    assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.fim_pad_id, tok.file_sep_id) == (1, 2, 3, 4, 5)
    assert tok.special_ids == {t.name: t.id for t in SPECIAL_TOKENS}
    for t in SPECIAL_TOKENS:
        assert tok.id_to_token(t.id) == t.content
        assert getattr(tok, f"{t.name}_id", t.id) == t.id


def test_every_special_token_is_one_id_unless_disallowed(tok):
    for t in SPECIAL_TOKENS:
        text = f"a{t.content}b"
        ids = tok.encode(text)
        assert t.id in ids and ids.count(t.id) == 1, t.content
        plain = tok.encode(text, allow_special=False)
        assert all(i >= len(SPECIAL_TOKENS) for i in plain), t.content  # raw text cannot inject control ids
        assert tok.decode(ids) == text and tok.decode(plain) == text


def test_no_implicit_tokens_and_digits_split(tok):
    assert tok.encode("") == []
    ids = tok.encode("x = 1234567")
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == list("1234567")  # every digit its own token, nothing merged across digits
    assert tok.encode("hello")[0] != tok.bos_id


def test_indentation_is_compact(tok):
    snippet = "def f(x):\n    if x:\n        return x\n    return 0\n"
    pieces = [tok.decode([i]) for i in tok.encode(snippet)]
    # each indentation run is one token (not one per space), and the snippet is ~1 token per word
    assert sum(p.strip() == "" and len(p) > 1 for p in pieces) == 3, pieces
    assert len(pieces) <= 18, pieces
    assert len(tok.encode(" " * 8 + " return")) <= 2


@given(st.text())
@SETTINGS
def test_roundtrip_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=False)) == text


@given(st.binary(max_size=300))
@SETTINGS
def test_roundtrip_bytes_like(tok, raw):
    for text in (raw.decode("latin-1"), raw.decode("utf-8", "replace"), raw.decode("utf-8", "surrogateescape")
                 .encode("utf-8", "replace").decode("utf-8")):
        assert tok.decode(tok.encode(text)) == text


CODE_ALPHABET = st.sampled_from(list("abcdefxyz_0123456789 \t\n\r()[]{}:;.,=+-*/%<>!&|^~'\"#@\\`$?"))
CODE_WORDS = st.sampled_from(["def ", "return ", "    ", "\n", "class ", "if ", "else:", "<|im_end|>", "<think>",
                              "<fim_middle>", "</tool_call>", "😀", "日本語", "\u0301", "\x00", "\ufeff"])


@given(st.lists(st.one_of(CODE_ALPHABET, CODE_WORDS), max_size=200).map("".join))
@SETTINGS
def test_roundtrip_code(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=False)) == text


def test_save_load_roundtrip(tok, tmp_path):
    d = tok.save(tmp_path / "t")
    assert (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()
    again = Tokenizer.load(d)
    text = corpus()[0][:5000] + "<|im_start|>user\nhi<|im_end|>"
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    texts = corpus()[:5] + [text, ""]
    for allow in (True, False):  # the parallel batch path agrees with encode()
        assert tok.encode_batch(texts, allow_special=allow) == [tok.encode(t, allow_special=allow) for t in texts]


def test_transformers_encodes_identically(tok, hf_tok):
    assert hf_tok.bos_token_id == 0 and hf_tok.eos_token_id == 28 and hf_tok.pad_token_id == 4
    assert len(hf_tok) == tok.vocab_size
    texts = corpus()[:4] + [PROSE, "  leading spaces\n\n\ttabs\r\n", "digits 0123456789 and 3.5e-10", "😀 日本語 é"]
    texts.append("".join(t.content for t in SPECIAL_TOKENS))
    texts += [f"text {t.content} more" for t in SPECIAL_TOKENS]
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, text[:80]
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    for t in SPECIAL_TOKENS:
        assert hf_tok.convert_tokens_to_ids(t.content) == t.id


@given(st.text(max_size=200))
@SETTINGS
def test_transformers_equal_on_arbitrary_text(tok, hf_tok, text):
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)


def test_skip_special_keeps_think_and_tool_tokens(tok, hf_tok):
    text = "<|im_start|>assistant\n<think>hm</think><tool_call>{}</tool_call><|im_end|><|endoftext|>"
    ids = tok.encode(text)
    kept = "assistant\n<think>hm</think><tool_call>{}</tool_call>"
    assert tok.decode(ids, skip_special_tokens=True) == kept
    assert hf_tok.decode(ids, skip_special_tokens=True) == kept
    cfg = json.loads((Path(hf_tok.name_or_path) / "tokenizer_config.json").read_text())
    flags = {v["content"]: v["special"] for v in cfg["added_tokens_decoder"].values()}
    assert flags["<think>"] is False and flags["</tool_response>"] is False and flags["<|im_end|>"] is True


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizers JSON"):
        Tokenizer.load(tmp_path / "bad")
    from tokenizers import trainers
    from mellum2.tokenizer.bpe import new_hf_tokenizer
    plain = new_hf_tokenizer()  # a byte-level BPE without Mellum 2's special tokens is refused
    plain.train_from_iterator([PROSE] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    (tmp_path / "plain").mkdir()
    plain.save(str(tmp_path / "plain" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="must have id 0"):
        Tokenizer.load(tmp_path / "plain")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], 100)
    with pytest.raises(ValueError, match="no non-empty"):
        train_bpe(["", ""], 512)
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_cli_train_info_encode(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i, m in enumerate(MODULES[:6]):
        (src / f"m{i}.py").write_text((STDLIB / m).read_text(encoding="utf-8"))
    (src / "notes.txt").write_text(PROSE * 20)
    out = tmp_path / "tok"
    assert tok_cli(["train", "--input", str(src), "--vocab-size", "600", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "trained 600 entries" in printed
    assert Tokenizer.load(out).vocab_size == 600
    assert tok_cli(["info", str(out)]) == 0
    assert "<|im_end|>" in capsys.readouterr().out
    assert tok_cli(["encode", str(out), "a<|im_end|>"]) == 0
    assert "28" in capsys.readouterr().out
    assert tok_cli(["decode", str(out), "27", "28"]) == 0
    assert capsys.readouterr().out.strip() == "<|im_start|><|im_end|>"
    assert mellum2_cli(["tokenizer", "info", str(tmp_path / "nowhere")]) == 1  # one line from the dispatcher
    assert "no tokenizer file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tok_cli(["train", "--input", str(src), "--vocab-size", "12", "--out", str(out)])
    assert e.value.code == 2
    assert mellum2_cli(["tokenizer", "train", "--input", str(tmp_path / "nope"), "--vocab-size", "600", "--out",
                        str(out), "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert mellum2_cli(["tokenizer", "train", "--input", str(src), "--vocab-size", "600", "--out", str(a_file),
                        "--no-progress"]) == 2  # a bad argument (UsageError)
    assert "exists and is not a directory" in capsys.readouterr().err
    assert a_file.read_text() == "x"  # nothing overwritten
