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


# ---------------------------------------------------------------------------------------------- healing
HEAL_TEXTS = ["class Stack:\n    def push(self, x):\n        self.items.append(x)\n        return self.items\n",
              "def f(s):\n    s = s.lower()\n    return s == s[::-1]\n"] * 40


@pytest.fixture(scope="module")
def bpe_model():
    from mellum2.tokenizer import train_bpe
    tok = train_bpe(HEAL_TEXTS, 400)
    torch.manual_seed(0)
    m = Mellum2(ModelConfig.from_preset("test-small").replace(vocab_size=tok.vocab_size)).eval()
    return m, tok


def test_the_bpe_splits_indentation_before_a_word(bpe_model):
    """What healing is for: a prompt ending in 8 spaces ends in a token training never saw before code."""
    _, tok = bpe_model
    ids = tok.encode("        self.items", allow_special=False)
    assert tok.decode(ids[:1]) == " " * 7 and tok.decode(ids[1:2]).startswith(" self")
    assert tok.decode(tok.encode("x\n        ", allow_special=False)[-1:]).strip(" ") == ""


def test_heal_backs_up_one_token_and_picks_greedily_among_the_agreeing_tokens(bpe_model):
    from mellum2.infer.fim import heal
    m, tok = bpe_model
    prompt = [tok.bos_id] + tok.encode("class Stack:\n    def push(self, x):\n        ", allow_special=False)
    healed, extra = heal(m, tok, prompt, 1)
    assert healed[:len(prompt) - 1] == prompt[:-1] and len(healed) >= len(prompt)
    assert healed[len(prompt) - 1:] != prompt[-1:]  # the model did not just take the 8-space token back
    # the healed ids decode to the original text plus `extra`, and each new token agrees with what was left
    assert tok.decode(healed[1:]) == tok.decode(prompt[1:]) + extra
    rest, ids = tok.decode(prompt[-1:]), prompt[:-1]
    texts = [tok.decode([i]) for i in range(tok.vocab_size)]
    special = set(tok.special_ids.values())
    for pick in healed[len(prompt) - 1:]:
        allowed = [i for i, t in enumerate(texts) if i not in special and t and (t.startswith(rest) or rest.startswith(t))]
        with torch.no_grad():
            logits = m(torch.tensor([ids])).logits[0, -1]
        assert pick == allowed[int(logits[allowed].argmax())]  # hand-checked greedy choice
        rest, ids = rest[len(texts[pick]):], ids + [pick]


def test_heal_leaves_a_prompt_ending_in_a_special_token_alone(bpe_model):
    from mellum2.infer.fim import heal
    m, tok = bpe_model
    p = fim_prompt(tok, "def f(s):\n", "    return s\n")
    assert heal(m, tok, p, 1) == (p, "")
    assert heal(m, tok, p[:1], 1) == (p[:1], "")  # nothing past the head


@pytest.mark.parametrize("fim", [True, False])
def test_healed_completion_continues_the_prompt_text(bpe_model, fim):
    """The text returned follows the original prefix: the healed tokens' extra text, then the rest; plain
    and speculative greedy agree; heal=False is the unhealed prompt's completion."""
    m, tok = bpe_model
    prefix, suffix = "class Stack:\n    def push(self, x):\n        ", "\n        return self.items\n"
    run = (lambda **kw: complete(m, tok, prefix, suffix, 8, **kw)) if fim else \
        (lambda **kw: continue_text(m, tok, prefix, 8, **kw))
    healed, plain, spec = run(), run(heal=False), run(speculative=True)
    assert spec.text == healed.text and spec.tokens == healed.tokens
    head = fim_prompt(tok, prefix, suffix) if fim else [tok.bos_id] + tok.encode(prefix, allow_special=False)
    assert plain.tokens == naive_greedy(m, head, len(plain.tokens))
    full = tok.encode(prefix, allow_special=False)
    # the healed prompt: the prefix without its last token, the chosen tokens, then the new ones
    from mellum2.infer.fim import heal
    base = (fim_prompt(tok, prefix, suffix)[:len(full) + 1] if fim else [tok.bos_id] + full)
    if fim:
        sfx = [tok.fim_suffix_id] + tok.encode(suffix, allow_special=False) + [tok.fim_middle_id]
        ids, extra = heal(m, tok, base[:-1] + sfx + base[-1:], len(base) - 1 + len(sfx))
    else:
        ids, extra = heal(m, tok, base, 1)
    assert healed.text == extra + tok.decode(healed.tokens)
    assert healed.tokens == naive_greedy(m, ids, len(healed.tokens))


def test_heal_leaves_a_token_holding_part_of_a_character_alone(bpe_model):
    """A byte-level token with part of a multi-byte character decodes to U+FFFD: not text to match."""
    from mellum2.infer.fim import heal
    m, tok = bpe_model
    ids = tok.encode("x = 'é€'", allow_special=False)
    parts = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert parts, "the tiny BPE has no merges for these characters: their bytes are separate tokens"
    p = [tok.bos_id] + ids[:ids.index(parts[0]) + 1]
    assert heal(m, tok, p, 1) == (p, "")
