"""The inference engine: a scheduler of requests over one model (continuous batching). Token ids in,
a stream of tokens out; one engine for `mellum2.generate`, the CLI, evaluation, RL rollouts and the
server; tokenizer-agnostic (stop strings come through a detokenize callback).

The request API: `submit(prompt_ids, params) -> request id`, `cancel(rid)`, `step() -> [Delta]`,
`has_work()`, `run_until_done() -> {rid: Result}`, a background driver (`start()`/`stop()`) with a
thread-safe `stream(rid)` iterator or a per-request callback, and `stats()`. `generate(prompts)` /
`stream(prompts)` (a batch in, results out) are thin loops over it.

A step: take new requests and cancels; admit waiting requests into free rows ("slots") of the KV
pool (one KVCache of max_num_seqs rows, each row one request's positions: full layers hold the whole
context, sliding layers a ring); one decode forward over every decoding row (one token each, or
k+1 with MTP speculation: `speculative.speculative_step`); one prefill forward of at most
`prefill_chunk` prompt tokens of the requests being admitted (so a long prompt does not stall the
running streams, as Sarathi-Serve / vLLM's chunked prefill); then finished requests leave. Rows are
kept contiguous (decoding rows first, then the prefilling ones, which `prefill_chunk` makes at most
one partly done): a leaving request's row is refilled by moving later rows down, so every forward is
over a slice of the pool, a view without copies. A full pool queues requests (waiting, FIFO).

With a prefix cache (`prefix_cache_tokens` > 0, prefix.py) an admitted request copies the cached KV
of its prompt's leading blocks into its row and prefills the rest only.

Failures stay inside requests: an exception in a request's callbacks (detokenize) ends that request
("error"); an exception in a batched forward reruns its rows one at a time, and only the rows that
fail alone end with "error". The engine keeps serving.

Per step the device runs `Fast`/`Reference` forward + sampling with no host syncs; the host then reads
the step's tokens once (streaming and stop checks need them). `Engine(compile=True)` compiles the
plain decode step and the greedy speculative step per batch size and context bucket.

Follows nanochat's Engine (one engine shared by chat/eval/RL), vLLM's scheduler (continuous batching,
chunked prefill, automatic prefix caching) and gpt-fast (static cache, compiled step, speculative
decoding as one function).
"""
from __future__ import annotations

import queue
import threading
import time
import warnings
from collections import deque
from typing import Callable, Iterator, Sequence

import torch

from mellum2.model.transformer import Mellum2

from .forward import Fast, Reference
from .pool import Pool
from .prefix import PrefixCache
from .request import DECODE, PREFILL, WAITING, Delta, Request, Result, Stats
from .sampling import Sampler, SamplingParams
from .speculative import draft, gather_rows, speculative_step
from .window import Window
from .batch import Generation
from .steps import CompiledSteps

__all__ = ["Engine", "Generation", "Delta", "Result", "Stats", "engine_for"]

NO_MTP_NOTICE = ("this checkpoint has no MTP head (num_nextn_predict_layers=0): speculative decoding is off, "
                 "generating normally. `mellum2 train-mtp --model DIR` trains a head for it.")
AUTO_ROWS = 256  # max_num_seqs=None: the pool grows to the requests at hand, up to this many rows

# Bumped whenever any module anywhere registers a parameter or a submodule (assigning a new Parameter,
# swapping a layer, load_state_dict(assign=True)): engines re-list their model's parameters then only.
_STRUCTURE = [0]


def _bump(*_args):
    _STRUCTURE[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
torch.nn.modules.module.register_module_module_registration_hook(_bump)


class Engine:
    """Continuous-batching generation over a Mellum2 model (see the module docstring).

    fast: the decode fast path (forward.Fast) instead of the model's own trunk code (Reference).
    max_num_seqs: rows of the KV pool (requests decoding at once; more wait). None: grown to the
      requests at hand whenever the engine is idle (what a batched `generate` wants).
    max_model_len: longest prompt + max_new_tokens accepted (default: the model's context). With
      either of the two set, the pool is max_num_seqs (or as needed) rows of max_model_len (or the
      model's context) positions; with neither, each pool is sized to the requests at hand.
    prefill_chunk: prompt tokens prefilled per step (all admitted requests together).
    speculative, draft_tokens: MTP self-speculative decoding with k drafts for every request (when the
      model has an MTP head; `generate(speculative=...)` switches it while the engine is idle).
    prefix_cache_tokens: prompt tokens whose KV the prefix cache may hold (0: off); prefix_block: its
      block size in tokens.
    compile: torch.compile the plain decode step and the greedy speculative step (CPU: inductor's C++
      wrapper; CUDA: mode="reduce-overhead"), one graph per batch size and context bucket, over a pool
      of the model's full context (docs/inference.md "Compiled steps")."""

    def __init__(self, model: Mellum2, fast: bool = True, compile: bool = False, moe: str = "auto",
                 draft_vocab=None, prefill_chunk: int = 1024, max_num_seqs: int | None = None,
                 max_model_len: int | None = None, speculative: bool = False, draft_tokens: int = 1,
                 prefix_cache_tokens: int = 0, prefix_block: int = 16, detokenize: Callable | None = None):
        if not isinstance(model, Mellum2):
            raise TypeError(f"Engine: expected a mellum2 Mellum2 model, got {type(model).__name__}")
        for name, v, lo in (("prefill_chunk", prefill_chunk, 1), ("draft_tokens", draft_tokens, 1),
                            ("prefix_block", prefix_block, 1), ("prefix_cache_tokens", prefix_cache_tokens, 0)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"Engine: {name} must be an int >= {lo}, got {v!r}")
        if max_num_seqs is not None and (not isinstance(max_num_seqs, int) or max_num_seqs < 1):
            raise ValueError(f"Engine: max_num_seqs must be None or an int >= 1, got {max_num_seqs!r}")
        ctx = model.cfg.max_position_embeddings
        if max_model_len is not None and (not isinstance(max_model_len, int) or not 1 < max_model_len <= ctx):
            raise ValueError(f"Engine: max_model_len must be an int in [2, {ctx}] (the model's "
                             f"max_position_embeddings), got {max_model_len!r}")
        self.model = model  # no train/eval switch: Mellum2 has no dropout, and RL callers keep their mode
        self.cfg = model.cfg
        self.prefill_chunk, self.max_num_seqs, self.max_model_len = prefill_chunk, max_num_seqs, max_model_len
        self.detokenize = detokenize
        self.fwd = Fast(model, moe) if fast else Reference(model)
        self._params, self._params_key = [], None
        if draft_vocab is not None:
            self.set_draft_vocab(draft_vocab)
        self._versions = self._weight_versions()
        self.compile = compile
        self.compiled = CompiledSteps(self.fwd, self.device)  # used when compile=True
        self.prefix = PrefixCache(prefix_block, prefix_cache_tokens // prefix_block)
        # the pool and its per-row device state (row = slot; see the module docstring)
        self.pool: Pool | None = None
        self._rows: list[Request] = []  # by slot: decoding, then prefilling
        self._sampler_key, self._sampler = None, None
        # requests: every live one by id; the waiting queue; what other threads hand over
        self._reqs: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        self._inbox: deque[Request] = deque()
        self._cancels: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.last_finished: list[Request] = []
        self.totals = dict(prompt_tokens=0, cached_tokens=0, new_tokens=0, steps=0, prefill_steps=0,
                           drafted=0, accepted=0, requests=0, errors=0)
        self._rate = Window(10.0, max_items=4096)  # (time, tokens) of recent steps, for tokens/s
        self.speculative, self.k, self.notice = False, draft_tokens, None
        self._set_mode(speculative, draft_tokens)

    # ------------------------------------------------------------------ model
    @property
    def device(self):
        return self.model.lm_head.weight.device

    @property
    def dtype(self):
        return self.model.lm_head.weight.dtype

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling steps so far."""
        return self.compiled.compile_s

    @property
    def has_mtp(self) -> bool:
        return self.model.mtp is not None

    def _weight_versions(self) -> tuple:
        """In-place updates (optimizer steps, load_state_dict) bump tensor versions, `.to()` makes new
        tensors: the fast path re-reads the weights (and the prefix cache empties) when this key changes.
        The parameter list is walked again only when some module registered a parameter or a submodule
        since the last walk (`_STRUCTURE`), so a step pays a sum of versions, not a walk of the model."""
        if self._params_key != _STRUCTURE[0]:
            self._params, self._params_key = list(self.model.parameters()), _STRUCTURE[0]
        w = self.model.lm_head.weight
        return (sum(p._version for p in self._params), len(self._params), id(self.model.mtp), w.dtype, w.device,
                w.data_ptr())

    def _check_weights(self) -> None:
        if self._weight_versions() != self._versions:
            self._params_key = None  # `.to()` may have swapped the Parameter objects without a registration
            self.fwd.refresh()
            self.cfg = self.model.cfg
            self._versions = self._weight_versions()
            self.prefix.clear()

    def set_draft_vocab(self, ids) -> None:
        """Speculative drafts only from these token ids (see forward.Fast.set_draft_vocab); None: all."""
        if not isinstance(self.fwd, Fast):
            raise ValueError("Engine.set_draft_vocab: needs the fast path (Engine(fast=True))")
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long)
            if ids.dim() != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
                raise ValueError(f"Engine.set_draft_vocab: expected a non-empty list of ids in "
                                 f"[0, {self.cfg.vocab_size})")
        self.fwd.set_draft_vocab(ids)
        if hasattr(self, "compiled"):
            self.compiled.clear()  # compiled speculative steps traced the old draft head

    def _set_mode(self, speculative: bool, k: int) -> None:
        """Speculation on/off and k for every request; only while no request is in the engine."""
        if k < 1:
            raise ValueError(f"generate: draft_tokens must be >= 1, got {k}")
        self.notice = None
        if speculative and not self.has_mtp:
            speculative, self.notice = False, NO_MTP_NOTICE
            warnings.warn(f"mellum2: {NO_MTP_NOTICE}", stacklevel=4)
        if (bool(speculative), k) == (self.speculative, self.k):
            return
        if self.has_work():
            raise RuntimeError(f"Engine: cannot switch to speculative={speculative} draft_tokens={k} while "
                               f"requests run with speculative={self.speculative} draft_tokens={self.k}")
        self.speculative, self.k = bool(speculative), k
        self.prefix.clear()  # the MTP layer's entries exist only when speculating

    # ------------------------------------------------------------------ the request API
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None,
               *, detokenize: Callable | None = None, callback: Callable[[Delta], None] | None = None,
               stats: Stats | None = None) -> str:
        """Queue a request; its id (request_id, or a new one). Thread-safe. Bad input raises ValueError.
        callback(delta) is called on the engine's thread with each of its Deltas; stats: count into
        this object (a batch's shared Stats) instead of the request's own."""
        params = SamplingParams() if params is None else params
        detok = detokenize or self.detokenize
        prompt = self._validate(prompt_ids, params, detok, "prompt")
        req = Request(prompt, params, request_id, self.cfg.eos_ids, detok, self.device)
        if stats is not None:
            req.res.stats = stats
        req.callback = callback
        with self._lock:
            if req.id in self._reqs:
                raise ValueError(f"submit: request id {req.id!r} is already in the engine")
            self._reqs[req.id] = req
            if self._thread is not None:
                req.listen()  # the driver may produce its first Delta before stream(rid) is called
            self._inbox.append(req)
        self._wake.set()
        return req.id

    def cancel(self, request_id: str) -> None:
        """End a request at the next step (finish_reason "cancelled"); unknown or finished ids are ignored."""
        self._cancels.append(request_id)
        self._wake.set()

    def has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._rows or self._cancels)

    def run_until_done(self) -> dict[str, Result]:
        """Step until no request is left; the Results of the requests that finished meanwhile."""
        out = {}
        while self.has_work():
            self.step()
            for r in self.last_finished:
                out[r.id] = r.res
        return out

    def stream(self, request, params=None, speculative: bool = False, draft_tokens: int = 1,
               detokenize: Callable | None = None):
        """stream(request_id): an iterator of that request's Deltas until its finished one; thread-safe
        (with the driver running it waits on the request's queue, else it steps the engine itself).
        stream(prompts, params, ...): a batched generate call as an iterator (`Generation`)."""
        if not isinstance(request, str):
            return Generation(self, request, params, speculative, draft_tokens, detokenize)
        with self._lock:
            req = self._reqs.get(request)
            if req is None:
                raise KeyError(f"Engine.stream: no request {request!r} in the engine (finished or never submitted)")
            q = req.listen()
        return self._follow(q)

    def _follow(self, q: queue.Queue) -> Iterator[Delta]:
        while True:
            if self._thread is not None:
                d = q.get()
            else:
                try:
                    d = q.get_nowait()
                except queue.Empty:
                    if not self.has_work():
                        return
                    self.step()
                    continue
            yield d
            if d.finished:
                return

    def _follow_all(self, q: queue.Queue, more: Callable[[], bool]) -> Iterator[Delta]:
        """Deltas put on q (by the requests' callbacks) while more(): waits on the driver thread if it
        runs, else steps the engine in this thread."""
        while more():
            if self._thread is not None:
                yield q.get()
                continue
            try:
                yield q.get_nowait()
            except queue.Empty:
                self.step()

    def start(self) -> None:
        """Drive the engine from a background thread (submit/cancel/stream from any thread)."""
        if self._thread is not None:
            return
        self._stopping = False
        with self._lock:
            for r in self._reqs.values():
                r.listen()
        self._thread = threading.Thread(target=self._loop, name="mellum2-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the driver after its current step (requests stay in the engine)."""
        t = self._thread
        if t is None:
            return
        self._stopping = True
        self._wake.set()
        t.join()
        self._thread = None

    def _loop(self) -> None:
        while not self._stopping:
            if not self.has_work():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failure outside any one request: end them all, go on
                self._fail_all(f"{type(e).__name__}: {e}")

    def stats(self) -> dict:
        """running, waiting, KV pool use, tokens/s over the last seconds, prefix cache and speculation."""
        now = time.perf_counter()
        w = self._rate
        w.expire(now)
        span = now - w.items[0][0] if len(w.items) > 1 else 0.0
        toks = w.total - w.items[0][1] if w.items else 0  # the tokens after the first step's time
        rows = list(self._rows)
        pool = self.pool
        used = sum(r.n + 1 if r.state == DECODE else r.done_prompt for r in rows)
        t = self.totals
        return dict(
            running=sum(r.state == DECODE for r in rows), prefilling=sum(r.state == PREFILL for r in rows),
            waiting=len(self._waiting) + len(self._inbox),
            kv_slots=pool.batch if pool else 0, kv_slots_used=len(rows),
            kv_tokens=pool.batch * pool.capacity if pool else 0, kv_tokens_used=used,
            kv_use=used / (pool.batch * pool.capacity) if pool else 0.0,
            tokens_per_s=toks / span if span > 0 else 0.0,
            speculative=self.speculative, draft_tokens=self.k if self.speculative else 0,
            acceptance=t["accepted"] / t["drafted"] if t["drafted"] else 0.0,
            prefix_cache_blocks=len(self.prefix), prefix_cache_bytes=self.prefix.nbytes(),
            compile_s=self.compile_s, compiled_graphs=len(self.compiled.graphs), **t)

    # ------------------------------------------------------------------ validation
    def _validate(self, prompt_ids, params: SamplingParams, detok, label: str) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        prompt = [int(t) for t in prompt_ids]
        if not isinstance(params, SamplingParams):
            raise ValueError(f"submit: expected SamplingParams, got {type(params).__name__}")
        if not prompt:
            raise ValueError(f"generate: {label} is empty (give at least one token, e.g. the bos id)")
        V = self.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"generate: {label} has token ids outside the vocabulary [0, {V}): {bad[:5]}")
        if params.stop and detok is None:
            raise ValueError("generate: stop strings need a detokenize callback (ids -> str); the engine is "
                             "tokenizer-agnostic")
        limit = self.max_model_len or self.cfg.max_position_embeddings
        if len(prompt) + params.max_new_tokens > limit:
            raise ValueError(f"generate: {label} ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                             f"exceeds max_model_len={limit} (the model's max_position_embeddings="
                             f"{self.cfg.max_position_embeddings})")
        return prompt

    # ------------------------------------------------------------------ a step
    @torch.no_grad()
    def step(self) -> list[Delta]:
        """One scheduling step (module docstring): the Deltas it produced, every request's in order."""
        deltas: list[Delta] = []
        self.last_finished = []
        self._check_weights()
        self._take_inbox(deltas)
        self._admit()
        n_dec = next((i for i, r in enumerate(self._rows) if r.state != DECODE), len(self._rows))
        if n_dec:
            self._guarded(self._decode, 0, n_dec, deltas)
        pre = self._prefill_group()
        if pre:
            self._guarded(self._prefill, pre[0], pre[1], deltas)
        self._compact()
        self._publish(deltas)
        return deltas

    def _take_inbox(self, deltas) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            cancels, self._cancels = set(self._cancels), deque()
        for r in new:
            self.totals["requests"] += 1
            self.totals["prompt_tokens"] += len(r.prompt)
            if r.p.max_new_tokens == 0:
                deltas.append(r.finish("length"))
            else:
                self._waiting.append(r)
        for rid in cancels:
            r = self._reqs.get(rid)
            if r is None or r.finished:
                continue
            if r.state == WAITING:
                self._waiting.remove(r)
            deltas.append(r.finish("cancelled"))

    def _publish(self, deltas) -> None:
        now = time.perf_counter()
        self._rate.add(now, sum(len(d.token_ids) for d in deltas))
        ended = []
        for d in deltas:
            r = self._reqs.get(d.request_id)
            if r is None:
                continue
            self.totals["new_tokens"] += len(d.token_ids)
            r.publish(d)
            if r.callback is not None:
                try:
                    r.callback(d)
                except Exception:  # noqa: BLE001 - a consumer's callback cannot stop the engine
                    pass
            if d.finished:
                ended.append(r)
                if d.finish_reason == "error":
                    self.totals["errors"] += 1
        with self._lock:
            for r in ended:
                self._reqs.pop(r.id, None)
        self.last_finished = ended

    def _fail_all(self, msg: str) -> None:
        deltas = [r.finish("error", msg) for r in list(self._rows) + list(self._waiting) if not r.finished]
        self._rows, self._waiting = [], deque()
        self._sampler_key = None
        self._publish(deltas)

    def _guarded(self, fn, a: int, b: int, deltas) -> None:
        """fn over rows a..b-1; if it raises, again one row at a time, and a row that fails alone ends
        with finish_reason "error" (the others of the batch are unaffected)."""
        try:
            fn(a, b, deltas)
            return
        except Exception as e:  # noqa: BLE001
            if b - a == 1:
                r = self._rows[a]
                deltas.append(r.finish("error", f"{type(e).__name__}: {e}"))
                return
        for i in range(a, b):
            if not self._rows[i].finished:
                self._guarded(fn, i, i + 1, deltas)

    # ------------------------------------------------------------------ the pool
    def _need(self, r: Request) -> int:
        return len(r.prompt) + r.p.max_new_tokens + 2 * self.k + 1

    def _ensure_pool(self) -> bool:
        """(Re)build the pool while no row is in use when it cannot hold the next waiting requests;
        False when the head of the queue must wait for rows to free."""
        head = self._waiting[0]
        p = self.pool
        fits = p is not None and p.fits(self._need(head), self.k, self.speculative, self.dtype, self.device)
        if fits and (self._rows or self.max_num_seqs is not None or p.batch >= min(len(self._waiting), AUTO_ROWS)):
            return len(self._rows) < p.batch
        if self._rows:
            return fits and len(self._rows) < p.batch
        rows = self.max_num_seqs or max(min(len(self._waiting), AUTO_ROWS), p.batch if p is not None else 1)
        if self.compile:
            cap = self.cfg.max_position_embeddings + 2 * self.k + 1
        elif self.max_model_len is not None or self.max_num_seqs is not None:
            cap = (self.max_model_len or self.cfg.max_position_embeddings) + 2 * self.k + 1
        else:
            cap = max(self._need(r) for r in list(self._waiting)[:rows])
            if p is not None and (p.dtype, p.device) == (self.dtype, self.device):
                cap = max(cap, p.capacity)
        self.pool = Pool(self.cfg, rows, cap, self.dtype, self.device, self.k, self.speculative)
        self.compiled.clear()  # compiled steps captured the old pool's views
        if p is not None and (p.dtype, p.device) != (self.dtype, self.device):
            self.prefix.clear()  # its blocks are in the old dtype / on the old device
        return True

    def _admit(self) -> None:
        while self._waiting and self._ensure_pool():
            r = self._waiting.popleft()
            r.slot, r.state = len(self._rows), PREFILL
            self._rows.append(r)
            self.pool.clear_row(r.slot)
            n = self.prefix.load(self.pool, r, mtp=self.speculative)
            self.totals["cached_tokens"] += n

    def _compact(self) -> None:
        """Drop finished rows and keep the rest contiguous, decoding rows first, with as few row copies
        as possible: the decoding rows beyond the new decoding count fill the holes below it (one copy
        per leaving request, not a shift of every later row), and the prefilling rows follow in their
        order (their prefill order is FIFO)."""
        if not any(r.finished for r in self._rows):
            return
        dec = [r for r in self._rows if not r.finished and r.state == DECODE]
        pre = [r for r in self._rows if not r.finished and r.state != DECODE]
        n = len(dec)
        held = {r.slot for r in dec if r.slot < n}
        holes = (s for s in range(n) if s not in held)
        for r in dec:
            if r.slot >= n:
                self._move(r, next(holes))
        for t, r in enumerate(pre, start=n):
            if r.slot != t:
                self._move(r, t)
        self._rows = sorted(dec, key=lambda r: r.slot) + pre

    def _move(self, r: Request, dst: int) -> None:
        self.pool.move(r.slot, dst, (r.n + 2 * self.k + 2) if r.state == DECODE else r.done_prompt)
        r.slot = dst

    def _sampler_for(self, rows: list[Request]) -> Sampler:
        """The Sampler of these rows (rebuilt when the batch changes): the requests' own generators and
        penalty memory (their rows of the new Sampler's memory from then on)."""
        key = tuple(r.id for r in rows)
        if key == self._sampler_key:
            return self._sampler
        s = Sampler([r.p for r in rows], self.cfg.vocab_size, self.device, [r.prompt for r in rows],
                    gens=[r.gen for r in rows])
        for b, r in enumerate(rows):
            for mem, name in ((s.seen_BV, "seen_V"), (s.out_BV, "out_V")):
                if mem is not None:
                    if getattr(r, name) is not None:
                        mem[b] = getattr(r, name)
                    setattr(r, name, mem[b])
        self._sampler_key, self._sampler = key, s
        return s

    # ------------------------------------------------------------------ decode
    def _decode(self, a: int, b: int, deltas) -> None:
        rows = self._rows[a:b]
        B, k = b - a, self.k
        view = self.pool.view(a, b)
        sampler = self._sampler_for(rows)
        tok_B1, n_B = self.pool.tok_S1[a:b], self.pool.n_S[a:b]
        hi = max(r.n for r in rows) + (k + 1 if self.speculative else 1)
        extra = None
        if not self.speculative:
            if self.compile:
                logits_BTV = self.compiled.plain(view, a, tok_B1, n_B[:, None], hi)
            else:
                logits_BTV = self.fwd.head(self.fwd.trunk(tok_B1, n_B[:, None], view, hi=hi))
            out_BT, p_BTV = sampler.sample_with_probs(logits_BTV)
            if sampler.penalties:
                sampler.observe(out_BT)
            self.pool.tok_S1[a:b], self.pool.n_S[a:b] = out_BT, n_B + 1
            m_host = [0] * B
        else:
            extra = self.pool.drafts_Sk[a:b].clone()  # what this step verifies (the penalties' context)
            if sampler.plain_greedy and self.compile:
                res = self.compiled.speculative(view, a, k, tok_B1, extra, n_B, hi)
            else:
                q = None if sampler.plain_greedy else self.pool.q_rows(a, b)
                res = speculative_step(self.fwd, sampler, view, tok_B1, extra, q, n_B, k, hi)
            out_BT, m_B, logits_BTV, p_BTV, tok_B1, drafts_Bk, q_BkV, n_B = res
            self.pool.tok_S1[a:b], self.pool.n_S[a:b], self.pool.drafts_Sk[a:b] = tok_B1, n_B, drafts_Bk
            self.pool.set_q(a, b, q_BkV)
            m_host = m_B.tolist()
        self.totals["steps"] += 1
        self._emit(rows, out_BT, logits_BTV, p_BTV, sampler, m_host, deltas, extra)
        for r, m in zip(rows, m_host):
            r.n += m + 1
            if self.speculative:
                st = r.res.stats
                st.drafted, st.accepted, st.verify_rows = st.drafted + k, st.accepted + m, st.verify_rows + 1
                self.totals["drafted"] += k
                self.totals["accepted"] += m

    def _emit(self, rows, out_BT, logits_BTV, p_BTV, sampler: Sampler, m_host, deltas, extra=None) -> None:
        """Copy a step's tokens to the host (the step's one sync) and hand them to the requests.
        p_BTV: the distributions the tokens were drawn from (None: plain greedy)."""
        toks = out_BT.tolist()
        lps = tops = None
        if sampler.want_logprobs:
            chosen, top = sampler.logprobs(logits_BTV, out_BT, extra, p_BTV)
            lps = chosen.tolist()
            if top is not None:
                tv, ti = top.values.tolist(), top.indices.tolist()
                tops = [[list(zip(ti[b][j], tv[b][j])) for j in range(len(ti[b]))] for b in range(len(ti))]
        for b, r in enumerate(rows):
            n = m_host[b] + 1
            try:
                d = r.push(toks[b][:n], lps[b][:n] if lps else None, tops[b][:n] if tops else None)
            except Exception as e:  # noqa: BLE001 - e.g. the request's detokenize callback
                d = r.finish("error", f"{type(e).__name__}: {e}")
            if d is not None:
                deltas.append(d)

    # ------------------------------------------------------------------ prefill
    def _prefill_group(self):
        """Rows a..b-1 to prefill this step: the prefilling rows in order while the chunk budget lasts."""
        first = next((i for i, r in enumerate(self._rows) if r.state == PREFILL), None)
        if first is None:
            return None
        budget, b = self.prefill_chunk, first
        while b < len(self._rows) and budget > 0 and self._rows[b].state == PREFILL:
            budget -= min(self._rows[b].remaining_prompt, budget)
            b += 1
        return first, b

    def _prefill(self, a: int, b: int, deltas) -> None:
        rows = self._rows[a:b]
        budget, takes = self.prefill_chunk, []
        for r in rows:
            takes.append(min(r.remaining_prompt, budget))
            budget -= takes[-1]
        dev, cap = self.device, self.pool.capacity
        T = max(takes)
        starts = [r.done_prompt for r in rows]
        ids = [r.prompt[s:s + t] + [r.prompt[s + t - 1]] * (T - t) for r, s, t in zip(rows, starts, takes)]
        ids_BT = torch.tensor(ids, device=dev)
        pos_BT = (torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)).clamp(max=cap - 1)
        valid_BT = torch.arange(T, device=dev) < torch.tensor(takes, device=dev)[:, None]
        view = self.pool.view(a, b, fresh=all(s == 0 for s in starts))
        capture = self.prefix.max_blocks > 0
        if capture:
            view.capture = []
        hi = max(s + t for s, t in zip(starts, takes))
        h_BTD = self.fwd.trunk(ids_BT, pos_BT, view, valid_BT=valid_BT, hi=hi)
        last_B = torch.tensor(takes, device=dev) - 1
        done = [s + t == len(r.prompt) for r, s, t in zip(rows, starts, takes)]
        c = sum(done)  # the completed rows are the first c (only the last row of a group can be partial)
        if c:
            logits_c1V = self.fwd.head(gather_rows(h_BTD[:c], last_B[:c])[:, None])
            sampler = self._sampler_for(rows[:c])
            tok_c1, p_c1V = sampler.sample_with_probs(logits_c1V)
            if sampler.penalties:
                sampler.observe(tok_c1)
        if self.speculative:
            # the MTP layer over the chunk: (h_t, x_{t+1}); x after a completed prompt is the sampled token
            nxt = [r.prompt[s + t] if s + t < len(r.prompt) else 0 for r, s, t in zip(rows, starts, takes)]
            nxt_B = torch.tensor(nxt, device=dev)
            if c:
                nxt_B[:c] = tok_c1[:, 0]
            next_BT = torch.cat([ids_BT[:, 1:], ids_BT[:, -1:]], 1).scatter(1, last_B[:, None], nxt_B[:, None])
            y_BD = self.fwd.mtp(h_BTD, next_BT, pos_BT, view, hi=hi, pick_B=last_B)[:, 0]
        if capture:
            self.prefix.keep(rows, takes, view.capture)
            view.capture = None
        for r, t in zip(rows, takes):
            r.done_prompt += t
        self.totals["prefill_steps"] += 1
        if not c:
            return
        n_c = torch.tensor([len(r.prompt) for r in rows[:c]], device=dev)
        self.pool.tok_S1[a:a + c], self.pool.n_S[a:a + c] = tok_c1, n_c
        if self.speculative:
            drafts, q = draft(self.fwd, sampler, self.pool.view(a, a + c), y_BD[:c], tok_c1[:, 0], n_c, self.k,
                              hi=max(len(r.prompt) for r in rows[:c]) + self.k + 1)
            self.pool.drafts_Sk[a:a + c] = drafts
            self.pool.set_q(a, a + c, q)
        for r in rows[:c]:
            r.state, r.n = DECODE, len(r.prompt)
            self.prefix.store(r)
        self._emit(rows[:c], tok_c1, logits_c1V, p_c1V, sampler, [0] * c, deltas)

    # ------------------------------------------------------------------ batched calls (thin loops)
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 speculative: bool = False, draft_tokens: int = 1, detokenize: Callable | None = None) -> list[Result]:
        run = Generation(self, prompts, params, speculative, draft_tokens, detokenize)
        for _ in run:
            pass
        return run.results


ATTR = "_mellum2_engine"


def engine_for(model: Mellum2) -> Engine:
    """The engine cached on a model (its fast-path tensors are prepared once). It lives in the model's
    __dict__ (a reference cycle the garbage collector frees with the model; a WeakKeyDictionary would
    keep the model alive through the engine's reference to it); copies and pickles of the model drop it."""
    eng = model.__dict__.get(ATTR)
    if eng is None:
        eng = Engine(model)
        model.__dict__[ATTR] = eng
    return eng


def _dropped():
    return None


Engine.__deepcopy__ = lambda self, memo: None
Engine.__reduce__ = lambda self: (_dropped, ())
