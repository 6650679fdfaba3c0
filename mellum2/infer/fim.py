"""Fill-in-the-middle completion, and the speculative completion `make demo` ends with.

The prompt is the PSM arrangement the data pipeline trains on (mellum2/data/fim.py, docs/data.md):

    <|endoftext|> <fim_prefix> prefix <fim_suffix> suffix <fim_middle>   -> the model writes the middle

A trained piece ends its document with `<|endoftext|>` right after the middle, so that token ends the
completion; `<filename>` (Mellum's FIM stop string), the eos and the other FIM sentinels also stop it
(a model that emits them has left the middle). The stop token is not part of the returned text.
Text is encoded with `allow_special=False` when the tokenizer supports it, so code that contains
`<fim_middle>` literally cannot inject a sentinel.

Token healing (`heal=True`, the default of `complete` and `continue_text`). Training cuts prefixes at
token boundaries of whole documents, but a prompt ends wherever the cursor is, often inside what the
document's tokenisation would have merged: the byte-level BPE writes the indentation before `self` as
7 spaces + " self", so a prefix ending in 8 spaces ends in a token that never precedes code in
training, and a small model answers that with noise. Healing (as Guidance and transformers'
`token_healing` do) takes the prompt's last token off and lets the model write that text again:
the first new tokens are constrained to agree with the removed text (each either extends what is left
of it or is a prefix of it), chosen greedily by the model, until the text is covered; the completion
returned is what follows the original prompt. The constrained steps run the model's own forward pass
on the prompt (a few extra forwards), then generation continues as usual.
"""
from __future__ import annotations

import ast
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from mellum2.locate import draft_vocab as stored_draft_vocab
from mellum2.locate import resolve_model_dir

from .api import as_model, make_params
from .engine import Engine, Stats, engine_for

# where a left-to-right completion of a top-level function ends: the next top-level statement (the stop
# sequences of HumanEval's evaluation, as bigcode-evaluation-harness uses them)
FUNCTION_STOPS = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\n@", "\nimport ", "\nfrom ")

DEMO_PROMPTS = (
    "def fibonacci(n):\n",
    ("def is_palindrome(s):\n    ", "\n    return s == s[::-1]\n"),
    "import os\n\n\ndef list_python_files(root):\n",
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        ",
     "\n\n    def pop(self):\n        return self.items.pop()\n"),
)


@dataclass
class Completion:
    text: str
    tokens: list[int] = field(default_factory=list)  # new ids, without the stop token
    finish_reason: str | None = None
    stats: Stats = field(default_factory=Stats)


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, allow_special=False))
    except TypeError:  # a tokenizer without the flag
        return list(tokenizer.encode(text))


def fim_stop_ids(tokenizer) -> tuple[int, ...]:
    names = ("eot_id", "eos_id", "file_sep_id", "fim_prefix_id", "fim_middle_id", "fim_suffix_id", "fim_pad_id")
    return tuple(sorted({int(getattr(tokenizer, n)) for n in names if getattr(tokenizer, n, None) is not None}))


def fim_prompt(tokenizer, prefix: str, suffix: str, bos: bool = True) -> list[int]:
    """PSM: [<|endoftext|>] <fim_prefix> prefix <fim_suffix> suffix <fim_middle>."""
    for n in ("fim_prefix_id", "fim_suffix_id", "fim_middle_id"):
        if getattr(tokenizer, n, None) is None:
            raise ValueError(f"fim_prompt: the tokenizer has no {n} (a FIM tokenizer is needed)")
    head = [tokenizer.bos_id] if bos and getattr(tokenizer, "bos_id", None) is not None else []
    return (head + [tokenizer.fim_prefix_id] + _encode(tokenizer, prefix) + [tokenizer.fim_suffix_id]
            + _encode(tokenizer, suffix) + [tokenizer.fim_middle_id])


def _finish(res, tokenizer, stop_ids) -> Completion:
    toks = res.tokens[:-1] if res.tokens and res.finish_reason == "stop" and res.tokens[-1] in stop_ids else res.tokens
    text = tokenizer.decode(toks)
    if isinstance(res.stop, str) and res.stop in text:  # a stop string: the text ends where it starts
        text = text[:text.index(res.stop)]
    return Completion(text, list(toks), res.finish_reason, res.stats)


def parses(source: str) -> bool:
    """Whether `source` is valid Python (ast.parse)."""
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte
        return False
    return True


def _engine(model) -> Engine:
    """An Engine as given, or the cached engine of a model / checkpoint directory."""
    return model if isinstance(model, Engine) else engine_for(as_model(model))


@lru_cache(maxsize=4)
def _token_texts(tokenizer) -> tuple:
    """Every id's text on its own ('' for special tokens, which healing never picks); () for a tokenizer
    that does not say its vocabulary size (nothing to heal with)."""
    n = getattr(tokenizer, "vocab_size", None)
    if not isinstance(n, int):
        return ()
    special = getattr(tokenizer, "special_ids", None)
    special = set(special.values()) if isinstance(special, dict) else set()
    return tuple("" if i in special else tokenizer.decode([i]) for i in range(n))


def _healable(texts: tuple, i: int) -> bool:
    """Token i is text healing can rewrite: known, not special, and whole characters (a byte-level token
    holding part of a multi-byte character decodes to U+FFFD alone and cannot be matched as text)."""
    return 0 <= i < len(texts) and bool(texts[i]) and "\ufffd" not in texts[i]


def heal(model, tokenizer, prompt: list[int], head: int) -> tuple[list[int], str]:
    """Token healing (module docstring) of `prompt`, whose first `head` ids (bos, sentinels) are not
    text to heal: returns the healed prompt and the text its new tokens add past the original prompt
    (the start of the completion). Prompt unchanged when its last token is not text."""
    texts = _token_texts(tokenizer)
    if len(prompt) <= head or not _healable(texts, prompt[-1]):
        return prompt, ""
    rest, ids = texts[prompt[-1]], prompt[:-1]
    m = model.model if isinstance(model, Engine) else as_model(model)
    dev = m.lm_head.weight.device
    while rest:
        allowed = [i for i, t in enumerate(texts) if t and (t.startswith(rest) or rest.startswith(t))]
        with torch.no_grad():  # the LM head at the last position only (not [T, V] logits of the prompt)
            logits = m.head(m.trunk(torch.tensor([ids], device=dev))[0][:, -1:])[0, -1]
        pick = allowed[int(logits[torch.tensor(allowed, device=dev)].argmax())]
        ids = ids + [pick]
        t = texts[pick]
        if len(t) >= len(rest):
            return ids, t[len(rest):]
        rest = rest[len(t):]
    return ids, ""


def _generate(model, tokenizer, prompt, head, params, speculative, draft_tokens, stop_ids, detokenize,
              healing: bool) -> Completion:
    extra, eng = "", _engine(model)  # one model for healing and generation (a directory is loaded once)
    if healing:
        prompt, extra = heal(eng, tokenizer, prompt, head)
    res = eng.generate([prompt], params, speculative, draft_tokens, detokenize=detokenize)[0]
    out = _finish(res, tokenizer, stop_ids)
    out.text = extra + out.text
    return out


def complete(model, tokenizer, prefix: str, suffix: str = "", max_new_tokens: int = 128,
             speculative: bool = False, draft_tokens: int = 1, heal: bool = True, **sampling) -> Completion:
    """The middle between `prefix` and `suffix` (greedy unless sampling options are given), the
    prefix's end token-healed unless heal=False. `model`: a Mellum2, a checkpoint directory or an Engine."""
    stop = fim_stop_ids(tokenizer)
    params = make_params(max_new_tokens, stop=list(stop), **sampling)
    prompt = fim_prompt(tokenizer, prefix, suffix)
    end = prompt.index(tokenizer.fim_suffix_id)  # the prefix is prompt[fim_prefix + 1:end]
    healing = heal and prompt[end - 1] != tokenizer.fim_prefix_id and _healable(_token_texts(tokenizer), prompt[end - 1])
    if healing:  # the prefix's last token moves behind <fim_middle>: PSM writes the middle right after it,
        prompt.append(prompt.pop(end - 1))  # and the healed tokens start the middle
    return _generate(model, tokenizer, prompt, len(prompt) - 1, params, speculative, draft_tokens, stop, None, healing)


def continue_text(model, tokenizer, text: str, max_new_tokens: int = 128, speculative: bool = False,
                  draft_tokens: int = 1, stop_strings=(), heal: bool = True, **sampling) -> Completion:
    """Left-to-right completion of `text` (after the bos), its end token-healed unless heal=False,
    stopping at the end of the document or at the first of `stop_strings` (FUNCTION_STOPS: the end of
    a top-level function), which the returned text does not include."""
    stop = tuple(i for i in (getattr(tokenizer, "eot_id", None), getattr(tokenizer, "eos_id", None)) if i is not None)
    params = make_params(max_new_tokens, stop=list(stop) + list(stop_strings), **sampling)
    prompt = [tokenizer.bos_id] + _encode(tokenizer, text)
    return _generate(model, tokenizer, prompt, 1, params, speculative, draft_tokens, stop,
                     tokenizer.decode if stop_strings else None, heal)


def demo_completion(model_dir_or_model, tokenizer, prompts=DEMO_PROMPTS, max_new_tokens: int = 64,
                    draft_tokens: int = 1, draft_vocab=None, compile: bool = False, say=print) -> dict:
    """Complete each prompt (a string: left to right, to the end of its top-level function; a (prefix,
    suffix) pair: FIM) greedily, plainly and with MTP speculation; print the completions, whether each
    filled-in function parses as Python, the acceptance and the speed-up. Returns the figures.
    Speculative greedy output is identical to plain greedy; that is checked here too. A checkpoint
    directory's draft_vocab.json (from `mellum2 train-mtp`) is used unless draft_vocab is given.
    compile: the engine's compiled decode steps; the times then leave out compiling (`compile_s`)."""
    m = as_model(model_dir_or_model)
    if draft_vocab is None and isinstance(model_dir_or_model, (str, Path)) and m.mtp is not None:
        draft_vocab = stored_draft_vocab(resolve_model_dir(model_dir_or_model))
    m = Engine(m, draft_vocab=draft_vocab, compile=compile)  # its own engine: the cached one keeps the full vocabulary
    totals = {"plain_s": 0.0, "spec_s": 0.0, "compile_s": 0.0, "tokens": 0, "drafted": 0, "accepted": 0,
              "identical": True, "parsed": 0, "prompts": len(prompts), "completions": []}
    spec = None
    for p in prompts:
        fim = isinstance(p, tuple)
        run = (lambda **kw: complete(m, tokenizer, p[0], p[1], max_new_tokens, **kw)) if fim \
            else (lambda **kw: continue_text(m, tokenizer, p, max_new_tokens, stop_strings=FUNCTION_STOPS, **kw))
        t0 = time.perf_counter()
        plain = run()
        t1 = time.perf_counter()
        spec = run(speculative=True, draft_tokens=draft_tokens)
        t2 = time.perf_counter()
        totals["plain_s"] += t1 - t0 - plain.stats.compile_s
        totals["spec_s"] += t2 - t1 - spec.stats.compile_s
        totals["compile_s"] += plain.stats.compile_s + spec.stats.compile_s
        totals["tokens"] += len(spec.tokens)
        totals["drafted"] += spec.stats.drafted
        totals["accepted"] += spec.stats.accepted
        totals["identical"] &= plain.tokens == spec.tokens
        source = f"{p[0]}{spec.text}{p[1]}" if fim else f"{p}{spec.text}"
        ok = parses(source)
        totals["parsed"] += ok
        totals["completions"].append({"prompt": p, "completion": spec.text, "parses": ok})
        shown = f"{p[0]}<FILL>{p[1]}" if fim else p
        say(f"--- prompt\n{shown}\n--- completion (MTP speculative, greedy{', compiled' if compile else ''})\n"
            f"{spec.text}\n--- the filled-in code parses as Python: {'yes' if ok else 'no'}\n")
    if spec is not None and spec.stats.notice:
        say(f"note: {spec.stats.notice}")
    acc = totals["accepted"] / totals["drafted"] if totals["drafted"] else 0.0
    totals.update(acceptance=acc, speedup=totals["plain_s"] / totals["spec_s"] if totals["spec_s"] else 0.0)
    say(f"{totals['parsed']}/{len(prompts)} completions parse as Python")
    say(f"speculative decoding{' (compiled engine)' if compile else ''}: acceptance {acc:.2f} "
        f"({totals['accepted']}/{totals['drafted']} drafts), {totals['tokens']} tokens in "
        f"{totals['spec_s']:.2f} s against {totals['plain_s']:.2f} s plain greedy: "
        f"{totals['speedup']:.2f}x the plain greedy speed"
        + (f" (compiling, {totals['compile_s']:.0f} s, not counted)" if compile else "")
        + f"; output identical to plain greedy: {totals['identical']}")
    return totals
