"""LongContextLoader: long packed rows with repository-level samples and repo-level FIM; exact resume."""
import numpy as np
import pytest
import torch

from mellum2.data.fim import FimIds, undo_fim
from mellum2.data.longctx import LongContextLoader
from mellum2.data.shards import ShardStore, ShardWriter, token_dtype, write_index
from mellum2.tokenizer import special_ids

SPECIAL = special_ids()
FIM = FimIds.from_special(SPECIAL)
RANGES = {"web": (100, 1000), "code": (1000, 2000), "math": (2000, 3000)}


class _Tok:
    def encode(self, s, allow_special=True):
        return [3000 + (ord(c) % 100) for c in s]  # names live in their own id range


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lc")
    rng = np.random.default_rng(0)
    shards = []
    for d, n_docs in (("web", 60), ("code", 80), ("math", 40)):
        w = ShardWriter(root, d, token_dtype(8192))
        for i in range(n_docs):
            n = int(rng.integers(50, 400))
            w.add(rng.integers(*RANGES[d], n), {"lang": "python" if d == "code" else "",
                                                "source": f"/src/pkg{i % 8}/mod{i}.py", "group": f"pkg{i % 8}"})
        shards += w.close()
    write_index(root, shards, token_dtype(8192), 8192, SPECIAL)
    return root


def _loader(d, **kw):
    kw = {"batch_size": 2, "seq_len": 2048, "total_tokens": 2048 * 2 * 20, "tokenizer": _Tok(), **kw}
    return LongContextLoader(d, **kw)


def test_rows_are_full_and_documents_are_delimited(data_dir):
    b = next(iter(_loader(data_dir)))
    ids, labels, pos = b["input_ids"], b["labels"], b["position_ids"]
    assert ids.shape == labels.shape == pos.shape == (2, 2048) and ids.dtype == torch.int64
    starts = pos == 0
    assert torch.equal(labels == -100, starts)  # -100 exactly at each item's first token, no padding
    assert torch.equal(labels[~starts], ids[~starts])
    assert starts[:, 0].all()
    d = torch.diff(pos, dim=1)
    assert ((d == 1) | (pos[:, 1:] == 0)).all()  # positions count up within an item


def test_repository_samples_and_repo_fim(data_dir):
    L = _loader(data_dir, repo_fraction=1.0, repo_fim_rate=1.0, seq_len=8192, total_tokens=8192 * 2 * 10)
    store = ShardStore(data_dir)
    b = next(L)
    row = b["input_ids"][0].numpy()
    pos = b["position_ids"][0].numpy()
    first = row[: np.flatnonzero(pos == 0)[1]] if (pos == 0).sum() > 1 else row
    assert first[0] == SPECIAL["fim_prefix"]
    # a complete item: undo the FIM and find one repository sample, files in order
    orig = undo_fim(first, FIM)
    group = next(g for g in L.groups if np.array_equal(L._repo(g)[: len(orig)], orig))
    sample = store.repo_sample(group, _Tok())
    assert sample[0] == SPECIAL["reponame"] and (sample == SPECIAL["file_sep"]).sum() >= 2
    # the middle (after <fim_middle>) lies inside one file: no file separator in it
    mid = first[np.flatnonzero(first == SPECIAL["fim_middle"])[0] + 1:]
    psm = first[1] != SPECIAL["fim_suffix"]
    if psm:
        assert SPECIAL["file_sep"] not in mid.tolist()


def test_single_document_mixture(data_dir):
    L = _loader(data_dir, repo_fraction=0.0, total_tokens=2048 * 2 * 40)
    counts = {d: 0 for d in RANGES}
    for b in L:
        x = b["input_ids"].flatten()
        for d, (lo, hi) in RANGES.items():
            counts[d] += int(((x >= lo) & (x < hi)).sum())
    total = sum(counts.values())
    # phase-3 mixture by document draws (23/59/18); token shares follow it loosely (lengths vary)
    assert counts["code"] / total == pytest.approx(0.59, abs=0.08)
    assert counts["math"] / total == pytest.approx(0.18, abs=0.06)


def test_exact_resume_and_distinct_ranks(data_dir):
    a = _loader(data_dir)
    ref = [next(a) for _ in range(6)]
    b = _loader(data_dir)
    for _ in range(3):
        next(b)
    sd = b.state_dict()
    c = _loader(data_dir)
    c.load_state_dict(sd)
    for want in ref[3:]:
        got = next(c)
        assert all(torch.equal(got[k], want[k]) for k in want)
    r0 = next(_loader(data_dir, rank=0, world_size=2))["input_ids"]
    r1 = next(_loader(data_dir, rank=1, world_size=2))["input_ids"]
    assert not torch.equal(r0, r1)
    with pytest.raises(ValueError, match="seq_len"):
        _loader(data_dir, seq_len=1024).load_state_dict(sd)
    assert len(list(_loader(data_dir))) == 20  # stops at the token budget


def test_bad_arguments(data_dir, tmp_path):
    with pytest.raises(ValueError, match="repo_fraction"):
        _loader(data_dir, repo_fraction=1.5)
    with pytest.raises(ValueError, match="seq_len"):
        _loader(data_dir, seq_len=4)
    with pytest.raises(Exception, match="index"):
        _loader(tmp_path)
