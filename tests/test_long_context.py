"""Long context: YaRN-extended checkpoints in transformers, passkey and ppl-by-position evaluations."""
import random

import pytest
import torch
import torch.nn.functional as F

from mellum2 import Mellum2, ModelConfig, load_pretrained
from mellum2.eval import passkey, ppl

transformers = pytest.importorskip("transformers")


def _base_cfg():
    # test-small with plain RoPE everywhere and a 32-token native context
    return ModelConfig.from_preset("test-small", max_position_embeddings=32, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})


def test_yarn_extended_checkpoint_matches_transformers_beyond_original_context(tmp_path):
    cfg = _base_cfg().extend_context(4)  # 32 -> 128, YaRN on full layers only
    assert cfg.rope_parameters["sliding_attention"]["rope_type"] == "default"
    m = Mellum2(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
    m.save_pretrained(tmp_path)
    ref = transformers.MellumForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 128))
    with torch.no_grad():
        a, b = ref(ids).logits, m(ids).logits
    err = (a - b)[:, 32:].abs().max().item()  # positions past original_max_position_embeddings
    assert err < 1e-4, err
    assert load_pretrained(tmp_path).cfg.rope_parameters == cfg.rope_parameters


class _Tok:
    """A character-level stand-in tokenizer (one id per character)."""
    file_sep_id, reponame_id, eot_id = 1, 2, 3

    def encode(self, s, allow_special=True):
        return [ord(c) for c in s]


def test_passkey_sample_layout():
    tok = _Tok()
    rng = random.Random(0)
    for depth in (0.0, 0.5, 1.0):
        s = passkey.make_sample(tok, 2000, depth, rng)
        text = "".join(map(chr, s.ids))
        assert abs(s.length - 2000) < len(passkey.FILLER)
        assert text.endswith(passkey.QUESTION + s.key + ".")
        assert "".join(map(chr, s.ids[-s.n_answer:])) == s.key + "."
        where = text.index(f"The pass key is {s.key}") / len(text)
        assert abs(where - depth) < 0.1


class _Oracle:
    """Logits that put all mass on the true next token (or on a wrong one)."""

    def __init__(self, ids, wrong_at=None):
        self.ids, self.wrong_at = ids, wrong_at

    def trunk(self, x):
        T = x.shape[1]
        nxt = torch.tensor(self.ids[1:T + 1])
        if self.wrong_at is not None:
            nxt[self.wrong_at] = (nxt[self.wrong_at] + 1) % 300
        return F.one_hot(nxt, 300).float()[None] * 10, []

    def head(self, h):
        return h


def test_passkey_scoring_is_exact_greedy():
    s = passkey.make_sample(_Tok(), 300, 0.5, random.Random(1))
    assert passkey.score(_Oracle(s.ids), s)
    assert not passkey.score(_Oracle(s.ids, wrong_at=len(s.ids) - 3), s)  # one answer digit wrong
    assert passkey.score(_Oracle(s.ids, wrong_at=10), s)  # a mistake in the filler does not matter
    good, bad = passkey.answer_stats(_Oracle(s.ids), s), passkey.answer_stats(_Oracle(s.ids, wrong_at=len(s.ids) - 3), s)
    n = s.n_key
    assert n == s.n_answer - 1 == 5  # the number's digits, then "."
    assert good["token_acc"] == 1.0 and bad["token_acc"] == pytest.approx((n - 1) / n)
    # the oracle's logits are 10 on one id out of 300: nll = ln(e^10 + 299) - 10 when right, that + 10 when wrong
    right = torch.logsumexp(torch.tensor([10.0] + [0.0] * 299), 0).item() - 10
    assert good["nll"] == pytest.approx(right, rel=1e-4)
    assert bad["nll"] == pytest.approx(right + 10 / n, rel=1e-4)
    dot = passkey.answer_stats(_Oracle(s.ids, wrong_at=len(s.ids) - 2), s)  # only the closing "." wrong
    assert dot["token_acc"] == 1.0 and not dot["exact"]


def test_nll_by_position_equals_cross_entropy():
    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    seqs = [torch.randint(0, 256, (50,)).tolist() for _ in range(2)]
    nll = ppl.nll_by_position(m, seqs, chunk=16)
    with torch.no_grad():
        x = torch.tensor(seqs)
        ref = F.cross_entropy(m(x).logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    rows = ppl.bucketed(nll, ppl.buckets_for(49, 8))
    assert [r["from"] for r in rows] == [0, 8, 16, 32] and rows[-1]["to"] == 49
    assert rows[0]["nll"] == pytest.approx(nll[:, :8].mean().item())


def test_repo_sequences(tmp_path):
    from mellum2.eval.longdata import repo_sequences
    for pkg in ("a", "b"):
        (tmp_path / "src" / pkg).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / pkg / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n" * 3)
    seqs = repo_sequences(_Tok(), 200, 2, tmp_path / "src")
    assert len(seqs) == 2 and all(len(s) == 200 for s in seqs)
    assert seqs[0][0] == _Tok.reponame_id and seqs[0].count(_Tok.file_sep_id) >= 3
    with pytest.raises(FileNotFoundError):
        repo_sequences(_Tok(), 10, 1, tmp_path / "missing")
