"""FIM completion: the PSM prompt the data pipeline trains on, stopping at the end of the middle;
and demo_completion (what `make demo` ends with)."""
import pytest
import torch

from mellum2 import Mellum2, ModelConfig
from mellum2.infer.fim import complete, continue_text, demo_completion, fim_prompt, fim_stop_ids, parses


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class CharTok:
    """One token per character (ids 40..), the special ids of mellum2.tokenizer.special."""
    bos_id = eot_id = 0
    fim_prefix_id, fim_middle_id, fim_suffix_id, fim_pad_id, file_sep_id = 1, 2, 3, 4, 5
    eos_id = 28

    def encode(self, text, allow_special=True):
        return [40 + ord(c) % 200 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 40) if i >= 40 else f"<{i}>" for i in ids)


def naive_greedy(m, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(m(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_fim_prompt_is_psm():
    t = CharTok()
    assert fim_prompt(t, "ab", "c") == [0, 1, 40 + ord("a"), 40 + ord("b"), 3, 40 + ord("c"), 2]
    assert fim_prompt(t, "ab", "c", bos=False)[0] == 1
    assert fim_stop_ids(t) == (0, 1, 2, 3, 4, 5, 28)


def test_complete_stops_at_the_end_of_the_middle():
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    t = CharTok()
    toks = naive_greedy(m, fim_prompt(t, "def f(x):", "return y"), 12)
    cut = next(i for i in range(3, 12) if toks[i] not in toks[:i] and toks[i] >= 6)
    t.eot_id = toks[cut]  # pretend the model's cut-th token is <|endoftext|>
    t.bos_id = 0
    c = complete(m, t, "def f(x):", "return y", max_new_tokens=12)
    assert c.tokens == toks[:cut] and c.finish_reason == "stop"
    assert c.text == t.decode(toks[:cut])
    spec = complete(m, t, "def f(x):", "return y", max_new_tokens=12, speculative=True)
    assert spec.tokens == c.tokens and spec.stats.speculative
    long = complete(m, CharTok(), "def f(x):", "return y", max_new_tokens=5)
    assert long.finish_reason == "length" and len(long.tokens) == 5


def test_fim_needs_fim_tokens():
    class NoFim(CharTok):
        fim_prefix_id = None
    with pytest.raises(ValueError, match="fim_prefix_id"):
        fim_prompt(NoFim(), "a", "b")


def test_demo_completion_reports_acceptance():
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    lines = []
    out = demo_completion(m, CharTok(), prompts=("def f():\n", ("a = ", "\nprint(a)")), max_new_tokens=8,
                          say=lines.append)
    assert out["identical"] and out["drafted"] > 0 and 0 <= out["acceptance"] <= 1
    assert "acceptance" in lines[-1] and "<FILL>" in "".join(lines)
    c = continue_text(m, CharTok(), "def f():\n", max_new_tokens=8)
    assert len(c.tokens) <= 8


def test_parses():
    assert parses("def f(x):\n    return x + 1\n")
    assert not parses("def f(x):\n    return x +\n")
    assert not parses("def f(x):\nreturn x\n")  # no indented body
    assert not parses("x = 1\x00")


def test_continue_text_ends_at_a_stop_string():
    """The text ends where the first stop string starts; the tokens run to the one that completed it."""
    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    t = CharTok()
    prompt = "def f():\n"
    toks = naive_greedy(m, [t.bos_id] + t.encode(prompt), 16)
    text = t.decode(toks)
    stop = text[5:7]
    c = continue_text(m, t, prompt, max_new_tokens=16, stop_strings=(stop,))
    j = next(j for j in range(len(toks) + 1) if stop in t.decode(toks[:j]))  # the token that completes it
    assert c.finish_reason == "stop" and c.text == text[:text.index(stop)] and c.tokens == toks[:j]
    spec = continue_text(m, t, prompt, max_new_tokens=16, stop_strings=(stop,), speculative=True)
    assert spec.tokens == c.tokens and spec.text == c.text


def test_demo_completion_checks_that_the_code_parses():
    m = Mellum2(ModelConfig.from_preset("test-small")).eval()
    lines = []
    out = demo_completion(m, CharTok(), prompts=("def f():\n", ("a = ", "\nprint(a)")), max_new_tokens=6,
                          say=lines.append)
    assert out["prompts"] == 2 and out["parsed"] == sum(c["parses"] for c in out["completions"])
    for c in out["completions"]:
        p = c["prompt"]
        assert c["parses"] == parses(p[0] + c["completion"] + p[1] if isinstance(p, tuple) else p + c["completion"])
    assert f"{out['parsed']}/2 completions parse as Python" in lines
    assert out["compile_s"] == 0.0
