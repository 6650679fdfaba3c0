"""A batched generate call over the engine's request API: `Engine.generate(prompts)` /
`Engine.stream(prompts)` submit one request per prompt and follow them to the end. Kept for the
callers that think in batches (`mellum2.generate`, the CLIs, evaluation, RL rollouts): the rows share
one Stats (prefill and decode time of the call, speculative counts), as a static batch would.
"""
from __future__ import annotations

import queue
import time
from typing import Iterator

import torch

from .request import Delta, Result, Stats
from .sampling import SamplingParams


class Generation:
    """One batched generate call over the engine's request API: an iterator of Deltas (`.row` = the
    prompt's index); `.results` (in prompt order) and `.stats` (shared by the rows) when done."""

    def __init__(self, engine, prompts, params, speculative, draft_tokens, detokenize):
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("generate: no prompts given")
        if params is None:
            params = SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        if draft_tokens < 1:
            raise ValueError(f"generate: draft_tokens must be >= 1, got {draft_tokens}")
        detok = detokenize or engine.detokenize
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine._validate(p, sp, detok, f"prompt {i}")
        engine._set_mode(speculative, draft_tokens)
        self.engine = engine
        self.stats = Stats(prompt_tokens=sum(map(len, prompts)), speculative=engine.speculative,
                           draft_tokens=engine.k if engine.speculative else 0, notice=engine.notice)
        self._q: queue.Queue = queue.Queue()
        self._row: dict[str, int] = {}
        self.results: list[Result] = []
        self._steps0, self._compile0 = engine.totals["steps"], engine.compile_s
        self._t0 = time.perf_counter()
        for i, (p, sp) in enumerate(zip(prompts, params)):
            rid = engine.submit(p, sp, detokenize=detok, callback=self._q.put, stats=self.stats)
            self._row[rid] = i
            self.results.append(engine._reqs[rid].res)
        self._left = len(prompts)
        self._it = None

    def __iter__(self) -> Iterator[Delta]:
        if self._it is None:
            self._it = self._run()
        return self._it

    def _run(self) -> Iterator[Delta]:
        eng, s = self.engine, self.stats
        firsts = 0
        t_first = None
        try:
            for d in eng._follow_all(self._q, lambda: self._left > 0):
                d.row = self._row[d.request_id]
                if d.finished:
                    self._left -= 1
                if d.token_ids and firsts < len(self._row) and len(self.results[d.row].tokens) == len(d.token_ids):
                    firsts += 1
                    if firsts == len(self._row):
                        t_first = time.perf_counter()
                yield d
        finally:
            if self._left:  # abandoned (an exception or a break in the caller): its requests go
                for rid, i in self._row.items():
                    if self.results[i].finish_reason is None:
                        eng.cancel(rid)
                if eng._thread is None:
                    eng.step()
        t1 = time.perf_counter()
        t_first = t_first or t1
        s.prefill_s, s.decode_s = t_first - self._t0, t1 - t_first
        s.compile_s = eng.compile_s - self._compile0
        s.steps = eng.totals["steps"] - self._steps0
        s.decode_tokens = s.new_tokens - sum(1 for r in self.results if r.tokens)
