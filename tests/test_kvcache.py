"""KVCache: cached decoding equals a full recompute at every step; cache bytes equal the accounting.

The reference is the model's own forward over the whole sequence so far (no cache). Windows are
tiny (test-small: 8, test-small2: 5) so every test runs far past the ring buffer's wrap-around.
"""
import pytest
import torch
import torch.nn.functional as F

from mellum2 import Mellum2, ModelConfig
from mellum2.infer.kvcache import KVCache, _few_queries
from mellum2.model.accounting import kv_cache_bytes


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _model(preset="test-small"):
    torch.manual_seed(0)
    return Mellum2(ModelConfig.from_preset(preset)).eval()


def _full_logits(m, ids_1T):
    with torch.no_grad():
        return m(ids_1T).logits[0]


@pytest.mark.parametrize("preset", ["test-small", "test-small2"])
@pytest.mark.parametrize("step_tokens", [1, 3])
def test_cached_decode_equals_full_recompute_every_step(preset, step_tokens):
    m = _model(preset)
    cfg = m.cfg
    lens = [5, 13, 9]  # ragged prompts: right-padded prefill with per-row positions
    steps = 24 // step_tokens + 6  # well past the window
    B = len(lens)
    seqs = [torch.randint(3, cfg.vocab_size, (n + steps * step_tokens,)) for n in lens]
    P = max(lens)
    cache = KVCache(cfg, B, P + steps * step_tokens + 1, step_tokens=step_tokens)
    ids = torch.stack([torch.cat([s[:n], s[:P - n]]) for s, n in zip(seqs, lens)])
    pos = torch.arange(P).expand(B, P)
    with torch.no_grad():
        cache.begin(pos, valid_BT=pos < torch.tensor(lens)[:, None])
        h, _ = m.trunk(ids, pos, cache=cache)
        logits = m.head(h)
    for b, n in enumerate(lens):
        ref = _full_logits(m, seqs[b][None, :n])
        torch.testing.assert_close(logits[b, :n], ref, rtol=1e-5, atol=1e-5)
    done = list(lens)
    for _ in range(steps):
        T = step_tokens
        ids = torch.stack([s[d:d + T] for s, d in zip(seqs, done)])
        pos = torch.stack([torch.arange(d, d + T) for d in done])
        with torch.no_grad():
            cache.begin(pos)
            logits = m.head(m.trunk(ids, pos, cache=cache)[0])
        for b in range(B):
            ref = _full_logits(m, seqs[b][None, : done[b] + T])[done[b]:]
            torch.testing.assert_close(logits[b], ref, rtol=1e-5, atol=1e-5)
        done = [d + T for d in done]


def test_rejected_tokens_are_overwritten():
    """Speculative steps write k+1 tokens of which only the first m+1 are right (m accepted drafts);
    the next step restarts after them. The stale entries must never be attended to."""
    m = _model()
    cfg = m.cfg
    k1 = 3
    seq = torch.randint(3, cfg.vocab_size, (90,))
    cache = KVCache(cfg, 1, 95, step_tokens=k1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        pos = torch.arange(6)[None]
        cache.begin(pos)
        m.trunk(seq[None, :6], pos, cache=cache)
        n = 6
        while n + k1 < 90:
            acc = int(torch.randint(0, k1, (), generator=g))  # tokens n..n+acc are right
            junk = torch.randint(3, cfg.vocab_size, (k1,), generator=g)
            ids = torch.cat([seq[n:n + 1 + acc], junk[: k1 - 1 - acc]])[None]
            pos = torch.arange(n, n + k1)[None]
            cache.begin(pos)
            logits = m.head(m.trunk(ids, pos, cache=cache)[0])
            ref = _full_logits(m, seq[None, : n + 1 + acc])[n:]
            torch.testing.assert_close(logits[0, : acc + 1], ref, rtol=1e-5, atol=1e-5)
            n += acc + 1


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_chunked_ragged_prefill(chunk):
    """Right-padded rows prefilled in chunks: a short last chunk fits the ring in place, and its
    padding (far past a short row's end) must not wrap onto that row's live ring slots."""
    m = _model()
    cfg = m.cfg
    lens = [3, 17, 9]
    seqs = [torch.randint(3, cfg.vocab_size, (n + 6,)) for n in lens]
    P, B = max(lens), len(lens)
    cache = KVCache(cfg, B, P + 8, step_tokens=3)
    ids = torch.stack([torch.cat([s[:n], torch.full((P - n,), 7)]) for s, n in zip(seqs, lens)])
    pos = torch.arange(P).expand(B, P)
    valid = pos < torch.tensor(lens)[:, None]
    with torch.no_grad():
        for a in range(0, P, chunk):
            cache.begin(pos[:, a:a + chunk], valid_BT=valid[:, a:a + chunk])
            m.trunk(ids[:, a:a + chunk], pos[:, a:a + chunk], cache=cache)
        for step in range(6):
            tok = torch.stack([s[n + step:n + step + 1] for s, n in zip(seqs, lens)])
            p = torch.tensor(lens)[:, None] + step
            cache.begin(p)
            logits = m.head(m.trunk(tok, p, cache=cache)[0])
            for b, n in enumerate(lens):
                ref = _full_logits(m, seqs[b][None, : n + step + 1])[-1]
                torch.testing.assert_close(logits[b, 0], ref, rtol=1e-5, atol=1e-5)


def test_long_prefill_then_chunked_continuation():
    """A prompt longer than the ring (overflow path), then a second prefill chunk, then decoding."""
    m = _model("test-small2")
    cfg = m.cfg
    seq = torch.randint(3, cfg.vocab_size, (60,))
    cache = KVCache(cfg, 1, 64, step_tokens=2)
    with torch.no_grad():
        for a, b in [(0, 23), (23, 41), (41, 43), (43, 45), (45, 46)]:
            pos = torch.arange(a, b)[None]
            cache.begin(pos)
            logits = m.head(m.trunk(seq[None, a:b], pos, cache=cache)[0])
            torch.testing.assert_close(logits[0], _full_logits(m, seq[None, :b])[a:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("mtp", [False, True])
def test_cache_bytes_match_accounting(dtype, nbytes, mtp):
    for preset in ["tiny", "test-small", "test-small2"]:
        cfg = ModelConfig.from_preset(preset)
        sizes = []
        for ctx in [1, cfg.sliding_window - 1, cfg.sliding_window, 3 * cfg.sliding_window, 1000]:
            with torch.device("meta"):
                c = KVCache(cfg, 2, ctx, dtype=dtype, device="meta", mtp=mtp)
            assert c.nbytes() == kv_cache_bytes(cfg, ctx, dtype_bytes=nbytes, batch=2, mtp=mtp), (preset, ctx)
            sizes.append(c.nbytes())
        # memory grows only through the full layers once the context passes the window
        n_full = cfg.layer_types.count("full_attention") + int(mtp)
        per = 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * nbytes
        assert sizes[4] - sizes[3] == per * n_full * (1000 - 3 * cfg.sliding_window)


def test_bad_arguments():
    cfg = ModelConfig.from_preset("test-small")
    with pytest.raises(ValueError, match="capacity"):
        KVCache(cfg, 1, 0)
    c = KVCache(cfg, 2, 8)
    with pytest.raises(ValueError, match="rows"):
        c.begin(torch.zeros(3, 1, dtype=torch.long))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("T", [1, 3])
def test_few_query_attention_equals_sdpa(dtype, tol, T):
    """The written-out attention a compiled CPU step traces (T <= 8 queries) equals SDPA with GQA and
    an additive mask: a causal block over T new tokens at per-row positions, plus a window."""
    g = torch.Generator().manual_seed(0)
    B, H, G, S, d = 2, 4, 2, 40, 16
    q = torch.randn(B, H, T, d, generator=g).to(dtype)
    k, v = (torch.randn(B, G, S, d, generator=g).to(dtype) for _ in range(2))
    pos_BT = torch.tensor([[20], [33]]) + torch.arange(T)
    dist = pos_BT[:, :, None] - torch.arange(S)
    mask = torch.where(((dist >= 0) & (dist < 12))[:, None], 0.0, float("-inf")).to(dtype)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = _few_queries(q, k, v, mask)
    assert got.shape == want.shape and got.dtype == dtype
    assert (got.float() - want.float()).abs().max() < tol
    other = _few_queries(q, k.roll(1, 1), v.roll(1, 1), mask)  # kv heads matched to the wrong query heads
    assert (other.float() - want.float()).abs().max() > 10 * tol
