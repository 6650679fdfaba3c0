"""Loader and curriculum on a synthetic shard directory whose domains use disjoint token ranges, so
every check reads the batches themselves: batch layout, document completeness, phase mixtures within
a stated tolerance, FIM rates (phase 3 code only), exact resume mid-phase, distinct data per rank,
determinism, seq_len changes, repetition cap, bad arguments, speed."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from mellum2.data.curriculum import DEFAULT_PHASES, DomainStream, phase_boundaries, plan, resolve_phases
from mellum2.data.fim import SPM, FimIds, undo_fim
from mellum2.data.loader import Loader
from mellum2.data.shards import ShardStore, ShardWriter, token_dtype, write_index
from mellum2.tokenizer import special_ids

RANGES = {"web": (100, 1000), "code": (1000, 2000), "math": (2000, 3000)}  # token ids of each domain
SIZES = {"web": (700, 5.5), "code": (300, 6.0), "math": (600, 5.0)}  # docs, lognormal mean of length
SPECIAL = special_ids()
FIM = FimIds.from_special(SPECIAL)
TOL = 0.02  # absolute tolerance on a phase's token shares (measured error is ~0.002, see docs/data.md)


def domain_of(tok: int) -> str | None:
    for d, (lo, hi) in RANGES.items():
        if lo <= tok < hi:
            return d
    return None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    shards = []
    for d, (n_docs, mu) in SIZES.items():
        w = ShardWriter(root, d, token_dtype(8192), shard_tokens=40_000)  # several shards per domain
        for i in range(n_docs):
            n = int(np.clip(rng.lognormal(mu, 0.9), 8, 6000))
            w.add(rng.integers(*RANGES[d], n), {"lang": "python" if d == "code" else "", "source": f"{d}/{i}",
                                                "group": f"{d}-pkg{i % 7}"})
        shards += w.close()
    write_index(root, shards, token_dtype(8192), 8192, SPECIAL)
    return root


def pieces(batch):
    """[(row, start, end)] of every piece (a run of positions starting at 0) in a batch."""
    out = []
    for r, pos in enumerate(batch["position_ids"].numpy()):
        starts = list(np.flatnonzero(pos == 0)) + [len(pos)]
        out += [(r, a, b) for a, b in zip(starts, starts[1:])]
    return out


def test_phase_boundaries_and_plan():
    assert phase_boundaries(1_000_000) == [580_000, 840_000, 1_000_000]
    rows = plan(1_000_000, {"web": 100_000, "code": 400_000, "math": 50_000})
    assert [r["tokens"] for r in rows] == [580_000, 260_000, 160_000]
    assert rows[0]["demand"]["web"] == pytest.approx(580_000 * 70 / 99)
    assert rows[-1]["capped"] == ["web"]  # web is asked for ~5.6 epochs > 4
    phases = resolve_phases([{"budget": 1, "mixture": {"code": 1}}, {"budget": 3, "mixture": {"web": 1}}], [0.2, 0.0])
    assert [p.budget for p in phases] == [0.25, 0.75] and phases[0].fim_rate == 0.2
    for bad, msg in [([{"budget": 1, "mixture": {"poetry": 1}}], "unknown domain"),
                     ([{"budget": 0, "mixture": {"web": 1}}], "budget"),
                     ([{"budget": 1, "mixture": {"web": 0}}], "positive sum"),
                     ([{"budget": 1, "mixture": {"web": 1}, "fim": 1}], "unknown field")]:
        with pytest.raises(ValueError, match=msg):
            resolve_phases(bad)
    with pytest.raises(ValueError, match="one rate per phase"):
        resolve_phases(None, [0.5])
    with pytest.raises(ValueError, match="fim_rate"):
        resolve_phases(None, [0.5, 2.0, 0.5])


def test_batch_layout(data_dir):
    loader = Loader(data_dir, batch_size=4, seq_len=256, total_tokens=100_000)
    assert loader.phase_boundaries == [58_000, 84_000, 100_000]
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    for v in batch.values():
        assert v.shape == (4, 256) and v.dtype == torch.int64
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    first = pos == 0
    assert torch.all(labels[first] == -100)  # the first token of a piece has no in-document context
    pad = ids == SPECIAL["fim_pad"]
    assert torch.all(labels[pad] == -100)
    rest = ~first & ~pad
    assert torch.equal(labels[rest], ids[rest])
    for r, a, b in pieces(batch):
        assert torch.equal(pos[r, a:b], torch.arange(b - a))
    assert loader.tokens_seen == 4 * 256 and len(loader) == -(-(100_000 - 1024) // 1024)


def test_pieces_are_exact_document_slices_and_all_tokens_are_used(data_dir, monkeypatch):
    """One phase, no repeats: every token of every document appears exactly once, FIM pieces undo to
    the stored slice, and the batches hold exactly the materialised pieces."""
    store = ShardStore(data_dir)
    loader = Loader(data_dir, 4, 512, total_tokens=10**9, max_repeats=1,
                    phases=[{"budget": 1, "mixture": {"web": 1, "code": 1, "math": 1}, "fim_rate": 0.5}])
    seen: dict[tuple[str, int], list[tuple[int, int]]] = {}
    made = []
    orig = loader._materialise

    def spy(item):
        toks = orig(item)
        d, doc, start, length, first, last, mode, i, j = item
        end = int(last or mode > 0)  # a FIM piece always ends with <|endoftext|>
        body = toks[first:len(toks) - end]
        if mode:
            body = undo_fim(body, FIM)
        assert np.array_equal(body, store.doc(d, doc, start, length))
        assert (toks[0] == 0) == bool(first) and (toks[-1] == 0) == bool(end)
        seen.setdefault((d, doc), []).append((start, length))
        made.append(toks)
        return toks

    monkeypatch.setattr(loader, "_materialise", spy)
    rows = []
    with pytest.raises(RuntimeError, match="repetition cap"):
        for batch in loader:
            rows += [r for r in batch["input_ids"].numpy()]
    for d in RANGES:
        lens = store.doc_lens(d)
        for doc, n in enumerate(lens):
            spans = sorted(seen[(d, doc)])
            assert spans[0][0] == 0 and sum(s[1] for s in spans) == n, (d, doc)
            assert all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))
    flat = np.concatenate([r[r != SPECIAL["fim_pad"]] for r in rows])
    assert np.array_equal(np.sort(flat), np.sort(np.concatenate(made)))


def run_phases(loader):
    """Content tokens per (phase, domain) and FIM counts per phase, read from the batches."""
    counts = np.zeros((3, 3))
    fim = np.zeros((3, 2))  # [phase, (pieces, fim pieces)]
    fim_domains = [set() for _ in range(3)]
    doms = list(RANGES)
    for batch in loader:
        k = loader.phase
        ids = batch["input_ids"].numpy()
        for d, (lo, hi) in RANGES.items():
            counts[k, doms.index(d)] += ((ids >= lo) & (ids < hi)).sum()
        for r, a, b in pieces(batch):
            piece = ids[r, a:b]
            if piece[0] == SPECIAL["fim_pad"]:
                continue
            has_fim = bool((piece == FIM.prefix).any())
            fim[k] += (1, has_fim)
            if has_fim:
                fim_domains[k].add(domain_of(int(piece[piece >= 100][0])))
    return counts, fim, fim_domains


def test_phase_mixtures_and_fim_rates(data_dir):
    loader = Loader(data_dir, 8, 512, total_tokens=3_000_000, max_repeats=100)
    counts, fim, fim_domains = run_phases(loader)
    for k, phase in enumerate(DEFAULT_PHASES):
        want = phase.weights(list(RANGES))
        got = counts[k] / counts[k].sum()
        for j, d in enumerate(RANGES):
            assert abs(got[j] - want[d]) < TOL, (phase.name, d, got[j], want[d])
    rate = fim[:, 1] / fim[:, 0]
    assert abs(rate[0] - 0.5) < 0.05 and abs(rate[1] - 0.1) < 0.04, rate
    code_pieces = fim[2, 0] * counts[2, 1] / counts[2].sum()  # roughly; phase 3 FIM only touches code
    assert fim_domains[2] == {"code"} and fim_domains[0] == {"web", "code", "math"}
    assert 0.3 < fim[2, 1] / code_pieces < 0.8
    stats = loader.stats()
    assert stats["pad_fraction"] < 0.03
    for k in range(3):
        assert sum(stats["emitted"][k].values()) > 0


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("stop", [0, 37, 300])  # start, mid phase 1, mid phase 2 (boundary at 283)
def test_resume_is_exact(data_dir, stop):
    kw = dict(batch_size=4, seq_len=256, total_tokens=500_000, seed=3)
    full = batches(Loader(data_dir, **kw), 330)
    first = Loader(data_dir, **kw)
    head = batches(first, stop)
    sd = json.loads(json.dumps(first.state_dict()))  # survives JSON
    resumed = Loader(data_dir, **kw)
    resumed.load_state_dict(sd)
    assert resumed.tokens_seen == stop * 1024 and resumed.phase == first.phase
    assert same(head + batches(resumed, 330 - stop), full)


def test_resume_with_torch_save_and_new_batch_size(data_dir, tmp_path):
    kw = dict(seq_len=128, total_tokens=200_000, seed=1)
    a = Loader(data_dir, batch_size=2, **kw)
    batches(a, 50)
    torch.save(a.state_dict(), tmp_path / "loader.pt")
    b = Loader(data_dir, batch_size=2, **kw)
    b.load_state_dict(torch.load(tmp_path / "loader.pt", weights_only=False))
    assert same(batches(a, 5), batches(b, 5))
    c = Loader(data_dir, batch_size=4, **kw)  # a batch-size ramp keeps the stream position
    c.load_state_dict(a.state_dict())
    assert c.tokens_seen == a.tokens_seen and next(c)["input_ids"].shape == (4, 128)


def test_seq_len_change_on_restore(data_dir):
    a = Loader(data_dir, 2, 128, total_tokens=100_000)
    batches(a, 10)
    b = Loader(data_dir, 2, 512, total_tokens=100_000)
    b.load_state_dict(a.state_dict())
    out = next(b)
    assert out["input_ids"].shape == (2, 512) and b.tokens_seen == 10 * 256 + 1024


def test_deterministic_and_seed_dependent(data_dir):
    kw = dict(batch_size=2, seq_len=128, total_tokens=100_000)
    assert same(batches(Loader(data_dir, seed=5, **kw), 20), batches(Loader(data_dir, seed=5, **kw), 20))
    assert not same(batches(Loader(data_dir, seed=5, **kw), 20), batches(Loader(data_dir, seed=6, **kw), 20))


def test_ranks_get_distinct_documents(data_dir, monkeypatch):
    docs = []
    for rank in range(2):
        loader = Loader(data_dir, 2, 256, total_tokens=10**6, rank=rank, world_size=2)
        assert loader.batch_tokens == 2 * 256 * 2
        got = set()
        orig = loader._materialise
        monkeypatch.setattr(loader, "_materialise", lambda item, got=got, orig=orig: got.add(item[:2]) or orig(item))
        batches(loader, 60)
        docs.append(got)
    assert docs[0] and docs[1] and not docs[0] & docs[1]  # within the first epoch: disjoint
    s0, s1 = DomainStream(10, 0, 1, 0, 2), DomainStream(10, 0, 1, 1, 2)
    a, b = [s0.next() for _ in range(5)], [s1.next() for _ in range(5)]
    assert sorted(a + b) == list(range(10))


def test_repetition_cap(data_dir):
    stream = DomainStream(3, 0, 0, max_repeats=2)
    assert sorted(stream.next() for _ in range(6)) == [0, 0, 1, 1, 2, 2]
    assert stream.next() is None and stream.exhausted
    loader = Loader(data_dir, 8, 512, total_tokens=10**9, max_repeats=1)
    with pytest.raises(RuntimeError, match="repetition cap"):
        for _ in loader:
            pass
    assert all(s.exhausted for s in loader.streams.values())


def test_bad_arguments_and_states(data_dir, tmp_path):
    for kw, msg in [(dict(batch_size=0), "batch_size"), (dict(seq_len=8), "seq_len"), (dict(total_tokens=0), "total_tokens"),
                    (dict(rank=2, world_size=2), "rank"), (dict(world_size=0), "world_size")]:
        args = dict(batch_size=2, seq_len=64, total_tokens=1000) | kw
        with pytest.raises(ValueError, match=msg):
            Loader(data_dir, **args)
    code_only = tmp_path / "code_only"
    w = ShardWriter(code_only, "code", token_dtype(8192))
    w.add(np.arange(1000, 1100), {})
    write_index(code_only, w.close(), token_dtype(8192), 8192, SPECIAL)
    with pytest.raises(ValueError, match="names no domain present"):
        Loader(code_only, 2, 64, 1000, phases=[{"budget": 1, "mixture": {"math": 1}}])
    with pytest.warns(UserWarning, match="renormalised"):
        only = Loader(code_only, 1, 128, 1000, fim_rates=[0, 0, 0])
    assert np.all(next(only)["input_ids"].numpy()[0, 1:101] == np.arange(1000, 1100))
    a = Loader(data_dir, 2, 64, 10_000, seed=1)
    for kw, field in [(dict(seed=2), "seed"), (dict(rank=1, world_size=2), "rank"), (dict(total_tokens=20_000), "total_tokens")]:
        args = dict(batch_size=2, seq_len=64, total_tokens=10_000, seed=1) | kw
        with pytest.raises(ValueError, match=field):
            Loader(data_dir, **args).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="version"):
        a.load_state_dict({"nonsense": 1})
    tiny = Loader(data_dir, 1, 64, total_tokens=64)
    assert len(list(tiny)) == 1  # stops at the budget


def test_groups_for_repository_samples(data_dir):
    store = ShardStore(data_dir)
    groups = store.groups("code")
    assert set(groups) == {f"code-pkg{i}" for i in range(7)}
    docs = list(store.iter_group("code-pkg3"))
    assert len(docs) == len(groups["code-pkg3"]) and all(m["group"] == "code-pkg3" and m["lang"] == "python"
                                                         for m, _ in docs)
    assert all(m["source"] == f"code/{i}" for (m, _), i in zip(docs, groups["code-pkg3"]))


def test_loader_is_fast(data_dir):
    loader = Loader(data_dir, 8, 512, total_tokens=10**8, max_repeats=100)
    next(loader)
    t = time.perf_counter()
    n = 50
    batches(loader, n)
    per_s = n / (time.perf_counter() - t)
    assert per_s > 20, per_s  # a tiny training step of 8 x 512 takes ~0.5-1 s: 20/s is >10x headroom


def test_every_fim_piece_ends_its_middle_with_endoftext(data_dir):
    """Also FIM pieces cut from the inside of a long document end with <|endoftext|> right after the
    middle: what an inference FIM prompt needs the model to produce when the middle is done."""
    loader = Loader(data_dir, 4, 128, total_tokens=40 * 4 * 128,
                    phases=[{"budget": 1, "mixture": {"web": 1, "code": 1, "math": 1}, "fim_rate": 1.0}])
    inner = 0
    for batch in loader:
        ids = batch["input_ids"].numpy()
        for r, a, b in pieces(batch):
            piece = ids[r, a:b]
            piece = piece[piece != SPECIAL["fim_pad"]]
            if len(piece) == 0 or FIM.middle not in piece:
                continue
            assert piece[-1] == SPECIAL["eot"], piece[-8:]
            inner += piece[0] != SPECIAL["eot"]  # no bos: a piece from inside a document
    assert inner > 0


@pytest.mark.parametrize("spm_rate", [0.0, 0.5, 1.0])
def test_spm_rate_sets_the_share_of_fim_pieces_in_spm_order(data_dir, spm_rate, monkeypatch):
    """The mode of every FIM piece the loader materialises (recorded at apply_fim: a piece with an empty
    prefix reads the same in both orders, so the output alone cannot tell them apart)."""
    import mellum2.data.loader as loader_mod
    modes, real = [], loader_mod.apply_fim
    monkeypatch.setattr(loader_mod, "apply_fim", lambda t, i, j, mode, f: (modes.append(mode), real(t, i, j, mode, f))[1])
    loader = Loader(data_dir, 4, 128, total_tokens=60 * 4 * 128,
                    phases=[{"budget": 1, "mixture": {"web": 1, "code": 1, "math": 1}, "fim_rate": 1.0,
                             "spm_rate": spm_rate}])
    for _ in loader:
        pass
    assert len(modes) > 100
    share = sum(m == SPM for m in modes) / len(modes)
    if spm_rate in (0.0, 1.0):
        assert share == spm_rate
    else:
        assert 0.35 < share < 0.65, share


def test_spm_rate_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="spm_rate"):
        resolve_phases([{"budget": 1, "mixture": {"code": 1}, "fim_rate": 0.5, "spm_rate": 1.5}])
