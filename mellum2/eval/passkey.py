"""Passkey retrieval (Mohtashami & Jaggi 2023): a number hidden at a given depth of filler text, asked
for at the end. Used to check context extension (Mellum 2 §4; the report uses RULER at 64K).

Scoring is exact greedy decoding without a decode loop: the answer is correct iff, fed the right
prefix, the model's argmax at every answer position is the answer token, which is precisely when
greedy generation would emit it. One forward pass per sample, however long the context.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


@dataclass
class Sample:
    ids: list[int]  # prompt + answer
    n_answer: int  # the last n_answer ids are the answer
    n_key: int  # the first n_key of those are the number itself (the rest: the closing ".")
    length: int
    depth: float
    key: str


def make_sample(tok, length: int, depth: float, rng: random.Random, digits: int = 5) -> Sample:
    """A prompt of about `length` tokens with the needle at relative `depth` (0 = start, 1 = end)."""
    key = "".join(rng.choice("0123456789") for _ in range(digits))
    if key[0] == "0":
        key = str(rng.randint(1, 9)) + key[1:]
    filler = tok.encode(FILLER)
    needle = tok.encode(NEEDLE.format(key=key))
    question = tok.encode(QUESTION)
    answer = tok.encode(key + ".")
    n_fill = max(0, length - len(needle) - len(question) - len(answer))
    reps = n_fill // len(filler) + 1
    hay = (filler * reps)[:n_fill]
    # insert at a filler-sentence boundary so the needle is never glued to a cut word
    cut = min(round(depth * n_fill / len(filler)) * len(filler), n_fill)
    ids = hay[:cut] + needle + hay[cut:] + question + answer
    key_ids = tok.encode(key)
    n_key = len(key_ids) if answer[:len(key_ids)] == key_ids else len(answer)
    return Sample(ids, len(answer), n_key, len(ids), depth, key)


@torch.no_grad()
def answer_stats(model, sample: Sample) -> dict:
    """Teacher-forced statistics of the answer: `exact` (greedy generation would emit all of it),
    `token_acc` (share of the number's tokens that are the argmax; digits are single tokens, so chance
    is ~0.1) and `nll` (mean negative log-likelihood per token of the number; ln 10 = 2.30 is a uniform
    digit guess); the closing "." counts for `exact` only. The graded two separate "retrieves a bit"
    from "retrieves nothing" when exact accuracy is 0."""
    head = getattr(model, "lm_head", None)  # test doubles carry no weights: they run on the CPU
    ids = torch.tensor([sample.ids], device=head.weight.device if head is not None else "cpu")
    h, _ = model.trunk(ids[:, :-1])
    logits = model.head(h[:, -sample.n_answer:]).float()[0]  # predictions for the answer tokens only
    target = ids[0, -sample.n_answer:]
    hit = logits.argmax(-1) == target
    k = sample.n_key
    nll = torch.nn.functional.cross_entropy(logits[:k], target[:k])
    return {"exact": bool(hit.all()), "token_acc": hit[:k].float().mean().item(), "nll": nll.item()}


def score(model, sample: Sample) -> bool:
    """True iff greedy decoding would produce the whole answer."""
    return answer_stats(model, sample)["exact"]


def run(model, tok, lengths, depths, samples: int = 5, seed: int = 0, progress=None) -> dict:
    """Exact accuracy per (length, depth) and per length, plus the graded answer statistics per length."""
    rng = random.Random(seed)
    grid, graded = {}, {}
    for L in lengths:
        for d in depths:
            st = [answer_stats(model, make_sample(tok, L, d, rng)) for _ in range(samples)]
            grid[(L, d)] = sum(s["exact"] for s in st) / len(st)
            graded.setdefault(L, []).extend(st)
            if progress:
                progress(L, d, grid[(L, d)])
    by_len = {L: sum(grid[(L, d)] for d in depths) / len(depths) for L in lengths}
    mean = lambda L, k: sum(s[k] for s in graded[L]) / len(graded[L])  # noqa: E731
    return {"grid": {f"{L}@{d}": a for (L, d), a in grid.items()}, "by_length": by_len,
            "token_acc_by_length": {L: mean(L, "token_acc") for L in lengths},
            "nll_by_length": {L: mean(L, "nll") for L in lengths}}
