"""One request's state in the engine, and what the engine hands back: Delta (new tokens of one request
in one step) and Result (all of them, once finished).

A Request is host-side bookkeeping only: its prompt, sampling parameters, where it is in its life
(waiting -> prefill -> decode -> finished), its KV slot in the engine's pool, the tokens it has
emitted, stop matching (stop token ids, stop strings through a detokenize callback, the token
budget), its own random generator (a seed gives the same tokens whatever batch the request runs
in), its speculative counters and, when someone streams it, a thread-safe queue of Deltas. The
engine owns the device tensors (KV pool, per-slot state); this module never touches them, and the
engine reads and changes a request only through the methods and fields below.

Finish reasons (as OpenAI/vLLM): "stop" (a stop token or string), "length" (max_new_tokens),
"cancelled" (Engine.cancel), "error" (something failed inside this request; `error` says what).
"""
from __future__ import annotations

import queue
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import SamplingParams

WAITING, PREFILL, DECODE, FINISHED = "waiting", "prefill", "decode", "finished"


@dataclass
class Stats:
    """Counts and times of a generate call (engine.Generation) or of one request."""
    prompt_tokens: int = 0
    new_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not recomputed)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0  # part of decode_s spent compiling steps (Engine(compile=True), first calls)
    decode_tokens: int = 0  # new tokens after the first (the first comes from the prefill)
    steps: int = 0  # decode forward passes
    speculative: bool = False
    draft_tokens: int = 0  # k
    drafted: int = 0  # drafts proposed to rows that were still generating
    accepted: int = 0
    verify_rows: int = 0  # (row, step) pairs that verified drafts
    notice: str | None = None

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per trunk pass per row: 1 + accepted drafts (1.0 without speculation)."""
        return (self.accepted + self.verify_rows) / self.verify_rows if self.verify_rows else 1.0

    @property
    def tokens_per_s(self) -> float:
        """Decode speed, compiling excluded."""
        t = self.decode_s - self.compile_s
        return self.decode_tokens / t if t > 0 else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(acceptance=self.acceptance, mean_accepted_length=self.mean_accepted_length,
                 tokens_per_s=self.tokens_per_s)
        return d


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)  # new tokens; a stop token that ended the row is included
    logprobs: list[float] | None = None  # see SamplingParams.logprobs_mode for what they are
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    stop: int | str | None = None  # what matched
    error: str | None = None  # finish_reason "error": what went wrong
    stats: Stats = field(default_factory=Stats)  # the request's own, or a generate call's (shared by its rows)


class Delta:
    """New tokens of one request in one step. `finished` marks its last Delta (which may carry no
    tokens: a cancel or an error). `tokens` is `token_ids`; `row` is the prompt's index in a
    batched `Engine.generate`/`stream` call (None for submitted requests)."""

    __slots__ = ("request_id", "token_ids", "logprobs", "top_logprobs", "finished", "finish_reason", "error",
                 "row")

    def __init__(self, request_id: str = "", token_ids: list[int] | None = None, logprobs=None, top_logprobs=None,
                 finished: bool = False, finish_reason: str | None = None, error: str | None = None, *,
                 row: int | None = None, tokens: list[int] | None = None):
        self.request_id = request_id
        self.token_ids = list(token_ids if token_ids is not None else (tokens or []))
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.finished = finished or finish_reason is not None
        self.finish_reason, self.error, self.row = finish_reason, error, row

    @property
    def tokens(self) -> list[int]:
        return self.token_ids

    def __repr__(self):
        return (f"Delta({self.request_id!r}, {self.token_ids}, finished={self.finished}, "
                f"finish_reason={self.finish_reason!r}" + (f", error={self.error!r})" if self.error else ")"))


class Request:
    """Host-side state of one request (see the module docstring)."""

    def __init__(self, prompt: list[int], params: SamplingParams, request_id: str | None, eos_ids,
                 detokenize: Callable | None, device):
        self.id = request_id if request_id is not None else uuid.uuid4().hex
        self.prompt, self.p = prompt, params
        self.detok = detokenize
        self.state = WAITING
        self.slot: int | None = None  # row of the engine's KV pool while prefilling or decoding
        self.done_prompt = 0  # prompt positions whose KV is in the slot (prefilled or from the prefix cache)
        self.res = Result()
        self.res.stats = Stats(prompt_tokens=len(prompt))
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.tail = max((len(s) for s in params.stop), default=0) * 4 + 4  # tokens that can hold a stop string
        if params.logprobs:
            self.res.logprobs = []
        if params.top_logprobs:
            self.res.top_logprobs = []
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, ()).item()))
        self.seen_V = self.out_V = None  # penalty memory rows (the engine's Sampler keeps them up to date)
        self.captured: dict[int, list] | None = None  # prefix caching: this prompt's k/v per layer while prefilling
        self.queue: queue.Queue | None = None  # Deltas for Engine.stream(rid)
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.n = 0  # decoding: position of the newest token (sampled, not yet in the cache)
        self.hit_blocks = 0  # prefix-cache blocks loaded into the slot
        self.callback: Callable | None = None  # called with each Delta (Engine.submit)

    # ------------------------------------------------------------------ life
    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    @property
    def remaining_prompt(self) -> int:
        return len(self.prompt) - self.done_prompt

    def finish(self, reason: str, error: str | None = None) -> Delta:
        """End the request (cancel, error, or an empty budget); the Delta that says so."""
        self.state = FINISHED
        self.res.finish_reason = reason
        self.res.error = error
        self.t_end = time.perf_counter()
        return Delta(self.id, [], [] if self.res.logprobs is not None else None, None, True, reason, error)

    # ------------------------------------------------------------------ tokens
    def push(self, toks: list[int], lps=None, tops=None) -> Delta | None:
        """Take the tokens of one step until a stop or the budget; the Delta of what was kept (None if
        nothing). Stop strings run the detokenize callback: an exception there is this request's error."""
        out, lp_out, top_out = [], [] if lps is not None else None, [] if tops is not None else None
        res = self.res
        if self.t_first is None:
            self.t_first = time.perf_counter()
        for i, t in enumerate(toks):
            if self.state == FINISHED:
                break
            out.append(t)
            res.tokens.append(t)
            if res.logprobs is not None:
                res.logprobs.append(lps[i])
                lp_out.append(lps[i])
            if res.top_logprobs is not None:
                res.top_logprobs.append(tops[i][: self.p.top_logprobs])
                top_out.append(tops[i][: self.p.top_logprobs])
            reason = None
            if t in self.stop_ids:
                reason, res.stop = "stop", t
            elif self.p.stop and self._stop_string():
                reason = "stop"
            elif len(res.tokens) >= self.p.max_new_tokens:
                reason = "length"
            if reason:
                self.state = FINISHED
                res.finish_reason = reason
                self.t_end = time.perf_counter()
        res.stats.new_tokens += len(out)
        if not out and self.state != FINISHED:
            return None
        return Delta(self.id, out, lp_out if self.p.logprobs else None, top_out,
                     self.state == FINISHED, res.finish_reason if self.state == FINISHED else None)

    def _stop_string(self) -> bool:
        """A stop string that ends in the text of the newest token (decoding only a short tail)."""
        tail = self.res.tokens[-self.tail:]
        now, before = self.detok(tail), self.detok(tail[:-1])
        for s in self.p.stop:
            if s in now and s not in before:
                self.res.stop = s
                return True
        return False

    # ------------------------------------------------------------------ streaming
    def listen(self) -> queue.Queue:
        """The request's Delta queue; created late, it starts with one Delta of everything so far."""
        if self.queue is None:
            self.queue = queue.Queue()
            res = self.res
            if res.tokens or self.state == FINISHED:
                self.queue.put(Delta(self.id, list(res.tokens), None if res.logprobs is None else list(res.logprobs),
                                     None if res.top_logprobs is None else list(res.top_logprobs),
                                     self.state == FINISHED, res.finish_reason, res.error))
        return self.queue

    def publish(self, d: Delta) -> None:
        if self.queue is not None:
            self.queue.put(d)
