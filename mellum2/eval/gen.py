"""Batched greedy generation for the completion evaluations, through the one engine.

`fim(...)` writes the middle between a prefix and a suffix in the PSM format the model trains on
(mellum2/infer/fim.py: `<|endoftext|><fim_prefix>prefix<fim_suffix>suffix<fim_middle>`), stopping
at the end of the middle; `left_to_right(...)` continues a prefix (after `<|endoftext|>`), stopping
at the end of the document. Both take optional stop strings (e.g. "\\n" for one line) and a token
budget for the context: a long prefix keeps its end, a long suffix its start (the code nearest the
cursor), as an IDE cuts a file around the caret.
"""
from __future__ import annotations

from typing import Sequence

from mellum2.infer.api import make_params
from mellum2.infer.engine import Engine, engine_for
from mellum2.infer.fim import fim_stop_ids

from .common import progress


def _enc(tok, text: str) -> list[int]:
    return list(tok.encode(text, allow_special=False))


def fim_prompt(tok, prefix: str, suffix: str, context: int) -> list[int]:
    """The PSM prompt with at most `context` tokens of prefix + suffix (split in proportion to what
    each has, the suffix at most half)."""
    p, s = _enc(tok, prefix), _enc(tok, suffix)
    if len(p) + len(s) > context:
        keep_s = min(len(s), context // 2)
        keep_p = context - keep_s
        p, s = p[max(0, len(p) - keep_p):], s[:keep_s]
    return [tok.bos_id, tok.fim_prefix_id, *p, tok.fim_suffix_id, *s, tok.fim_middle_id]


def ltr_prompt(tok, prefix: str, context: int) -> list[int]:
    p = _enc(tok, prefix)
    return [tok.bos_id, *p[max(0, len(p) - context):]]


def _run(model, tok, prompts: Sequence[list[int]], stop_ids, stops: Sequence[str], max_new_tokens: int,
         batch: int, desc: str, quiet: bool) -> list[str]:
    eng = model if isinstance(model, Engine) else engine_for(model)
    params = make_params(max_new_tokens, stop=[*stop_ids, *stops])
    out: list[str] = []
    for a in progress(range(0, len(prompts), batch), desc, quiet=quiet):
        res = eng.generate(prompts[a:a + batch], params, detokenize=tok.decode)
        for r in res:
            text = tok.decode([t for t in r.tokens if t not in stop_ids])
            for s in stops:  # the stop string itself ends the completion (kept when it is a newline)
                i = text.find(s)
                if i >= 0:
                    text = text[:i + (1 if s == "\n" else 0)]
            out.append(text)
    return out


def fim(model, tok, pairs: Sequence[tuple[str, str]], context: int, max_new_tokens: int = 64,
        stops: Sequence[str] = (), batch: int = 8, quiet: bool = False, desc: str = "fim") -> list[str]:
    """The greedy middle for each (prefix, suffix)."""
    prompts = [fim_prompt(tok, p, s, context) for p, s in pairs]
    return _run(model, tok, prompts, fim_stop_ids(tok), stops, max_new_tokens, batch, desc, quiet)


def left_to_right(model, tok, prefixes: Sequence[str], context: int, max_new_tokens: int = 64,
                  stops: Sequence[str] = (), batch: int = 8, quiet: bool = False, desc: str = "ltr") -> list[str]:
    """The greedy continuation of each prefix."""
    prompts = [ltr_prompt(tok, p, context) for p in prefixes]
    stop_ids = tuple(i for i in (tok.eot_id, tok.eos_id) if i is not None)
    return _run(model, tok, prompts, stop_ids, stops, max_new_tokens, batch, desc, quiet)
