"""Incremental detokenization and stop strings of the server (mellum2/serve/text.py): pieces
concatenate to the full decode, never split a UTF-8 character, never show a stop string or a piece
of one, and end before the first stop string; hidden ids (the eos) are not in the text."""
from __future__ import annotations

import pytest

from mellum2.serve.text import TextStream, _held


def pieces(tok, ids, stop=(), hide=(), step=1):
    ts = TextStream(tok, stop, hide)
    out = [ts.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    out.append(ts.finish())
    return out, ts


@pytest.mark.parametrize("step", [1, 2, 5])
def test_pieces_concatenate_to_the_decode(serve_model, step):
    _, _, tok = serve_model
    text = "def add(a, b):\n    return a + b  # é, ü, 你好, 🙂\n"
    ids = tok.encode(text)
    out, _ = pieces(tok, ids, step=step)
    assert "".join(out) == text
    assert not any("\ufffd" in p for p in out)  # multi-byte characters arrive whole


def test_stop_strings_are_cut_and_never_shown(serve_model):
    _, _, tok = serve_model
    text = "for i in range(10):\n    print(i)\nEND here"
    ids = tok.encode(text)
    for stop in (("print(",), ("\nEND", "zzz"), ("(i)",)):
        out, ts = pieces(tok, ids, stop)
        want = text[:min(text.find(s) for s in stop if s in text)]
        assert "".join(out) == want
        assert ts.matched in stop
        for s in stop:  # no piece of the text sent before the cut ends in a prefix of the stop string
            assert s not in "".join(out)


def test_no_stop_match_and_hidden_ids(serve_model):
    _, _, tok = serve_model
    ids = tok.encode("The answer is 42.") + [tok.eos_id]
    out, ts = pieces(tok, ids, ("nope",), hide={tok.eos_id})
    assert "".join(out) == "The answer is 42." and ts.matched is None
    out, _ = pieces(tok, ids + [9999])  # ids past the tokenizer are no text
    assert "".join(out) == "The answer is 42.<|im_end|>"


def test_held_tail():
    assert _held("abc</to", ("</tool_call>",)) == 4
    assert _held("abc", ("xyz",)) == 0
    assert _held("ab", ("b", "abc")) == 2
