"""The public generation API: `mellum2.generate(model, prompt_ids, ...)` and its streaming variant.

Thin wrappers over the Engine (engine.py) for the common case of one prompt (or a list of prompts)
and keyword sampling options. `model` is a Mellum2, a checkpoint directory or a training run directory
(loaded each call: pass the model for repeated calls). Engines are cached per model object, so repeated calls reuse the
prepared fast-path tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from mellum2.model import Mellum2, load_pretrained, resolve_model_dir  # noqa: F401 - re-exported

from .engine import Result, engine_for
from .sampling import SamplingParams


def as_model(model) -> Mellum2:
    """A Mellum2 as given, or loaded from a checkpoint or training run directory."""
    if isinstance(model, Mellum2):
        return model
    if isinstance(model, (str, Path)):
        return load_pretrained(resolve_model_dir(model))
    raise TypeError(f"expected a Mellum2 model or a checkpoint directory, got {type(model).__name__}")


def make_params(max_new_tokens=128, temperature=0.0, top_k=None, top_p=None, seed=None, stop=None,
                **kw) -> SamplingParams:
    """SamplingParams from keywords; `stop` may mix token ids (int) and stop strings (str)."""
    stop = [] if stop is None else ([stop] if isinstance(stop, (int, str)) else list(stop))
    ids = tuple(s for s in stop if isinstance(s, int))
    strs = tuple(s for s in stop if isinstance(s, str))
    bad = [s for s in stop if not isinstance(s, (int, str))]
    if bad:
        raise TypeError(f"stop: expected token ids (int) or strings, got {bad[:3]}")
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, stop_token_ids=ids + tuple(kw.pop("stop_token_ids", ())), stop=strs, **kw)


def _batched(prompt_ids) -> tuple[list[list[int]], bool]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            return [prompt_ids.tolist()], False
        return prompt_ids.tolist(), True
    prompt_ids = list(prompt_ids)
    if prompt_ids and not isinstance(prompt_ids[0], int) and not (
            isinstance(prompt_ids[0], torch.Tensor) and prompt_ids[0].dim() == 0):
        return [list(map(int, p)) for p in prompt_ids], True
    return [list(map(int, prompt_ids))], False


def generate(model, prompt_ids, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, speculative: bool = False, seed: int | None = None, stop=None, *,
             draft_tokens: int = 1, detokenize: Callable | None = None, **sampling) -> Result | list[Result]:
    """Generate from one prompt (list of ids -> Result) or a batch (list of lists / 2-D tensor ->
    list of Result). `.tokens` are the new ids, `.stats` has drafted/accepted/acceptance.
    More sampling keywords: min_p, repetition_penalty, presence_penalty, logprobs, top_logprobs,
    ignore_eos, stop_token_ids."""
    prompts, batched = _batched(prompt_ids)
    params = make_params(max_new_tokens, temperature, top_k, top_p, seed, stop, **sampling)
    res = engine_for(as_model(model)).generate(prompts, params, speculative, draft_tokens, detokenize)
    return res if batched else res[0]


class TokenStream:
    """Iterate to get new token ids as they are produced; `.result` (tokens, stats) afterwards."""

    def __init__(self, gen):
        self._gen = gen
        self.result: Result = gen.results[0]

    def __iter__(self) -> Iterator[int]:
        for delta in self._gen:
            yield from delta.tokens


def generate_stream(model, prompt_ids, max_new_tokens: int = 128, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, speculative: bool = False,
                    seed: int | None = None, stop=None, *, draft_tokens: int = 1,
                    detokenize: Callable | None = None, **sampling) -> TokenStream:
    """Like generate for one prompt, but yields token ids as they come."""
    prompts, batched = _batched(prompt_ids)
    if batched and len(prompts) != 1:
        raise ValueError("generate_stream: one prompt at a time (use Engine.stream for batches)")
    params = make_params(max_new_tokens, temperature, top_k, top_p, seed, stop, **sampling)
    return TokenStream(engine_for(as_model(model)).stream(prompts, params, speculative, draft_tokens, detokenize))
