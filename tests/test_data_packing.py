"""Packing: every token of every document is placed exactly once (best-fit and greedy), rows never
overflow, best-fit splits fewer documents than greedy concatenation, the buffer's order and state."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mellum2.data.packing import BestFitBuffer, chunk_spans, covers, pack_best_fit, pack_greedy, tokens_of


def check_complete(res, lengths):
    placed = tokens_of(res)
    for doc, n in enumerate(lengths):
        if n == 0:
            assert doc not in placed
        else:
            assert covers(placed[doc], n), (doc, n, placed[doc])
    for row in res.rows:
        assert sum(length for _, _, length in row) <= res.seq_len
    assert sum(lengths) + res.pad_tokens == len(res.rows) * res.seq_len


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=120), st.sampled_from([64, 128, 512, 1000]),
       st.integers(1, 64))
@settings(max_examples=150, deadline=None)
def test_every_token_kept_exactly_once(lengths, seq_len, buffer_size):
    check_complete(pack_best_fit(lengths, seq_len, buffer_size=buffer_size), lengths)
    gr = pack_greedy(lengths, seq_len)
    check_complete(gr, lengths)
    assert all(sum(x[2] for x in row) == seq_len for row in gr.rows[:-1])  # greedy rows are full


def test_best_fit_splits_fewer_documents_than_greedy():
    rng = np.random.default_rng(0)
    lengths = (rng.lognormal(5.5, 1.2, 4000)).astype(int) + 1  # code-like: many short, a long tail
    for seq_len in (512, 2048, 8192):
        bf, gr = pack_best_fit(lengths, seq_len), pack_greedy(lengths, seq_len)
        # best-fit only splits documents longer than a row; greedy splits any document crossing a row end
        assert bf.n_split == int((lengths > seq_len).sum())
        assert bf.split_rate < 0.6 * gr.split_rate, (seq_len, bf.split_rate, gr.split_rate)
        assert bf.pad_fraction < 0.02
        assert len(bf.rows) <= 1.02 * len(gr.rows)


def test_max_piece_leaves_room():
    res = pack_best_fit([100, 30], 64, max_piece=59)
    assert all(length <= 59 for row in res.rows for _, _, length in row)
    check_complete(res, [100, 30])
    with pytest.raises(ValueError, match="max_piece"):
        pack_best_fit([1], 8, max_piece=9)


def test_buffer_takes_largest_that_fits_oldest_first():
    buf = BestFitBuffer()
    for length, name in [(5, "a"), (9, "b"), (5, "c"), (3, "d"), (12, "e")]:
        buf.push(length, name)
    assert buf.tokens == 34 and len(buf) == 5
    assert buf.pop_fit(8) == (5, "a")  # 5 is the largest <= 8; "a" is older than "c"
    assert buf.fill(10) == [(9, "b")]  # 9, then nothing of size <= 1
    assert buf.pop_fit(2) is None
    state = buf.state()
    other = BestFitBuffer()
    other.load_state(state)
    assert other.fill(20) == buf.fill(20) == [(12, "e"), (5, "c"), (3, "d")]
    assert other.seq == buf.seq == 5 and len(other) == 0 and other.tokens == 0
    with pytest.raises(ValueError, match="length"):
        buf.push(0, "z")


def test_chunk_spans():
    assert chunk_spans(0, 4) == []
    assert chunk_spans(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert chunk_spans(4, 4) == [(0, 4)]
    with pytest.raises(ValueError):
        chunk_spans(3, 0)
