"""FIM: PSM/SPM layouts, reassembly to the original document (property test), uniform cuts, errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mellum2.data.fim import OVERHEAD, PSM, SPM, FimIds, apply_fim, draw_cuts, undo_fim
from mellum2.tokenizer import special_ids

FIM = FimIds.from_special(special_ids())


def test_ids_follow_the_tokenizer():
    assert (FIM.prefix, FIM.middle, FIM.suffix) == (1, 2, 3)
    with pytest.raises(ValueError, match="fim_prefix"):
        FimIds.from_special({})


def test_layouts():
    doc = np.array([10, 11, 12, 13, 14, 15])
    psm = apply_fim(doc, 2, 4, PSM, FIM)
    spm = apply_fim(doc, 2, 4, SPM, FIM)
    assert psm.tolist() == [1, 10, 11, 3, 14, 15, 2, 12, 13]  # <P> pre <S> suf <M> mid
    assert spm.tolist() == [1, 3, 14, 15, 2, 10, 11, 12, 13]  # <P><S> suf <M> pre mid
    assert undo_fim(psm, FIM).tolist() == doc.tolist() == undo_fim(spm, FIM).tolist()


@given(st.lists(st.integers(33, 9999), max_size=300), st.data(), st.sampled_from([PSM, SPM]))
@settings(max_examples=300, deadline=None)
def test_reassembles_to_original(doc, data, mode):
    n = len(doc)
    i = data.draw(st.integers(0, n))
    j = data.draw(st.integers(i, n))
    seq = apply_fim(np.array(doc, dtype=np.int64), i, j, mode, FIM)
    assert len(seq) == n + OVERHEAD and seq[0] == FIM.prefix
    assert undo_fim(seq, FIM).tolist() == doc


def test_cuts_are_uniform_and_sorted():
    rng = np.random.default_rng(0)
    n = 9
    cuts = np.array([draw_cuts(n, rng) for _ in range(20000)])
    assert np.all(cuts[:, 0] <= cuts[:, 1]) and cuts.min() == 0 and cuts.max() == n
    # each of the two (unsorted) draws is uniform on [0, n]: the pooled histogram is flat within 5%
    counts = np.bincount(cuts.ravel(), minlength=n + 1) / cuts.size
    assert np.allclose(counts, 1 / (n + 1), rtol=0.05)
    assert draw_cuts(0, rng) == (0, 0)


def test_bad_arguments():
    doc = np.arange(40, 50)
    with pytest.raises(ValueError, match="cuts must satisfy"):
        apply_fim(doc, 5, 3, PSM, FIM)
    with pytest.raises(ValueError, match="cuts must satisfy"):
        apply_fim(doc, 0, 11, PSM, FIM)
    with pytest.raises(ValueError, match="mode"):
        apply_fim(doc, 1, 2, 0, FIM)
    with pytest.raises(ValueError, match="does not start"):
        undo_fim(doc, FIM)
    with pytest.raises(ValueError, match="one <fim_suffix> before one <fim_middle>"):
        undo_fim(np.array([1, 2, 50, 3]), FIM)
