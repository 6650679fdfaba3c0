"""The server's one door to the inference engine: submit a request, read its outputs as an async
stream, cancel it. Everything the HTTP layer knows about the engine's API is in this file.

A worker thread owns the engine (PyTorch work never runs on the event loop); requests cross into it
through a locked inbox, and outputs come back to each request's asyncio.Queue with
`loop.call_soon_threadsafe`. Two ways to drive the engine:

- "continuous" (an engine with `submit`/`cancel`/`step`, the scheduler): every step the worker hands
  new requests and cancellations to the engine and forwards the step's deltas. A request joins the
  running batch at the next step and leaves when it finishes; a delta with `error` ends that request
  only.
- "static" (an engine with only `stream`, one batch per call): the worker takes up to max_num_seqs
  waiting requests, runs them as one batch to the end, then takes the next. A request that arrives
  meanwhile waits for the whole batch (what continuous batching removes; the load benchmark
  measures it, and max_num_seqs=1 is serving one request at a time). A cancelled row is no longer
  forwarded, and a batch whose rows are all cancelled stops at once. If a batch raises, each of its
  unfinished requests is replayed alone (every sampled request carries a seed, so its tokens do not
  depend on the batch) and the already-sent tokens are skipped: only the request that fails alone
  gets the error.

Admission is bounded: at most max_num_seqs running plus max_waiting waiting; past that `submit`
raises `Overloaded` (the server answers 503 with Retry-After), as vLLM bounds its waiting queue.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from mellum2.infer import SamplingParams

from .metrics import Metrics


class Overloaded(Exception):
    """The waiting queue is full."""


@dataclass
class Out:
    """New tokens of one request (one engine step); finish_reason or error on its last one."""
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    error: str | None = None


@dataclass(eq=False)
class Handle:
    """One submitted request, seen from both sides (the worker thread and the event loop)."""
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    sent: int = 0  # tokens forwarded so far (static replays skip this many)
    cancelled: bool = False
    done: bool = False
    tag: object = None

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_submit


def _deliver(items) -> None:
    """(on the event loop) put each output on its request's queue."""
    for h, out in items:
        h.queue.put_nowait((h, out))


class Backend:
    """See the module docstring. `engine`: a mellum2 Engine (or anything with its `stream` API, or
    the scheduler's submit/cancel/step API); detokenize: ids -> str, for stop strings."""

    def __init__(self, engine, detokenize: Callable | None = None, *, max_num_seqs: int = 8, max_waiting: int = 64,
                 speculative: bool = False, draft_tokens: int = 1, mode: str = "auto", metrics: Metrics | None = None):
        if mode == "auto":
            mode = "continuous" if all(hasattr(engine, a) for a in ("submit", "cancel", "step")) else "static"
        if mode not in ("continuous", "static"):
            raise ValueError(f"Backend: mode must be auto, continuous or static, got {mode!r}")
        if max_num_seqs < 1 or max_waiting < 0:
            raise ValueError(f"Backend: max_num_seqs must be >= 1 and max_waiting >= 0, got {max_num_seqs}, "
                             f"{max_waiting}")
        self.engine, self.detok, self.mode = engine, detokenize, mode
        self.max_num_seqs, self.max_waiting = max_num_seqs, max_waiting
        self.speculative = bool(speculative) and getattr(engine, "has_mtp", True)
        if mode == "continuous":  # the scheduler speculates for every request or none (set when built)
            self.speculative = bool(getattr(engine, "speculative", self.speculative))
        self.draft_tokens = draft_tokens
        self.metrics = metrics or Metrics()
        self._lock = threading.Condition()
        self._waiting: deque[Handle] = deque()
        self._running: dict[str, Handle] = {}
        self._cancels: list[Handle] = []
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.drafted = self.accepted = 0
        self._held: list | None = None  # a step's outputs, when they are handed over together
        self.fault: Callable | None = None  # tests: called with a static batch / each new request

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Backend":
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mellum2-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------ the event-loop side
    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue | None = None,
               tag=None) -> Handle:
        """Queue a request; raises Overloaded when the waiting queue is full. Its outputs go to `queue`
        as (handle, Out) pairs (a request's own queue unless given: one HTTP request's n choices
        share one); `tag` is the caller's (the choice index)."""
        if params.seed is None and not params.greedy:
            # a fixed seed makes the tokens independent of the batch (static replays rely on it)
            params = params.replace(seed=random.getrandbits(62))
        h = Handle(f"req-{next(self._ids)}", list(prompt_ids), params, asyncio.get_running_loop(),
                   asyncio.Queue() if queue is None else queue, tag=tag)
        with self._lock:
            if self._stop:
                raise Overloaded("the server is shutting down")
            if len(self._waiting) >= self.max_waiting + max(0, self.max_num_seqs - len(self._running)):
                raise Overloaded(f"{len(self._waiting)} requests are waiting (the queue holds {self.max_waiting} "
                                 f"besides {self.max_num_seqs} running)")
            self._waiting.append(h)
            self._gauges()
            self._lock.notify_all()
        return h

    def cancel(self, h: Handle) -> None:
        """Stop a request (a client that went away); its slot is freed at the next step."""
        with self._lock:
            if h.done or h.cancelled:
                return
            h.cancelled = True
            self.metrics.finished("abort", time.perf_counter() - h.t_submit)
            if h in self._waiting:
                self._waiting.remove(h)
                h.done = True
            else:
                self._cancels.append(h)
            self._gauges()
            self._lock.notify_all()

    async def outputs(self, handles: list[Handle]) -> AsyncIterator[tuple[Handle, Out]]:
        """(handle, output) pairs of requests sharing one queue until each has had its last output;
        cancels those still running if the consumer stops early (a client that went away)."""
        left = {id(h) for h in handles}
        try:
            while left:
                h, out = await handles[0].queue.get()
                if out.finish_reason is not None or out.error is not None:
                    left.discard(id(h))
                yield h, out
        finally:
            for h in handles:
                if not h.done:
                    self.cancel(h)

    def stats(self) -> dict:
        with self._lock:
            d = {"mode": self.mode, "running": len(self._running), "waiting": len(self._waiting),
                 "max_num_seqs": self.max_num_seqs, "speculative": self.speculative,
                 "drafted": self.drafted, "accepted": self.accepted}
        if self.mode == "continuous" and hasattr(self.engine, "stats"):
            try:
                d["engine"] = self.engine.stats()
            except Exception as e:  # stats are informative only
                d["engine"] = {"error": str(e)}
        return d

    # ------------------------------------------------------------------ the worker side
    def _gauges(self) -> None:
        """(lock held) running / waiting gauges (continuous: refined by the engine's stats each step)."""
        self.metrics.running.set(len(self._running))
        self.metrics.waiting.set(len(self._waiting))

    def _send(self, h: Handle, out: Out) -> None:
        now = time.perf_counter()
        if out.token_ids:
            if h.t_first is None:
                h.t_first = now
                self.metrics.ttft.observe(now - h.t_submit)
            elif h.t_last is not None:
                self.metrics.itl.observe(now - h.t_last)
            h.t_last = now
            h.sent += len(out.token_ids)
            self.metrics.tokens(len(out.token_ids))
        if out.finish_reason is not None or out.error is not None:
            h.done = True
            self.metrics.finished(out.finish_reason or "error", now - h.t_submit)
        if self._held is not None:
            self._held.append((h, out))
        else:
            self._post(h.loop, [(h, out)])

    def _post(self, loop, items) -> None:
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the event loop has closed (server shutdown): nobody to tell
            for h, _ in items:
                h.cancelled = True

    def _flush(self) -> None:
        """Hand a step's outputs to the event loop at once: one wake-up per step, not per request."""
        items, self._held = self._held, []
        by_loop: dict = {}
        for h, out in items:
            by_loop.setdefault(h.loop, []).append((h, out))
        for loop, xs in by_loop.items():
            self._post(loop, xs)

    def _work(self) -> None:
        try:
            (self._work_continuous if self.mode == "continuous" else self._work_static)()
        except BaseException as e:  # the worker must not die silently: end every request with the error
            if self._held:
                self._flush()
            self._held = None
            with self._lock:
                self._stop = True
                pending = list(self._waiting) + list(self._running.values())
                self._waiting.clear()
                self._running.clear()
            for h in pending:
                if not h.done:
                    self._send(h, Out([], error=f"the engine stopped: {type(e).__name__}: {e}"))
            raise

    # ---- static batches over Engine.stream
    def _work_static(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                batch = []
                while self._waiting and len(batch) < self.max_num_seqs:
                    batch.append(self._waiting.popleft())
                for h in batch:
                    self._running[h.rid] = h
                self._cancels.clear()
                self._gauges()
            try:
                self._run_batch(batch)
            except Exception as e:
                if len(batch) == 1:
                    h = batch[0]
                    if not h.done:
                        self._send(h, Out([], error=f"{type(e).__name__}: {e}"))
                else:  # replay each unfinished request alone: only one that fails alone gets the error
                    for h in batch:
                        if not h.done and not h.cancelled:
                            try:
                                self._run_batch([h])
                            except Exception as e1:
                                if not h.done:
                                    self._send(h, Out([], error=f"{type(e1).__name__}: {e1}"))
            finally:
                with self._lock:
                    for h in batch:
                        self._running.pop(h.rid, None)
                        if h.cancelled and not h.done:
                            h.done = True
                    self._gauges()

    def _run_batch(self, batch: list[Handle]) -> None:
        live = [h for h in batch if not h.cancelled]
        if not live:
            return
        if self.fault is not None:
            self.fault(live)
        self.metrics.kv_use.set(len(live) / self.max_num_seqs)  # slots of the static batch
        gen = self.engine.stream([h.prompt_ids for h in live], [h.params for h in live], self.speculative,
                                 self.draft_tokens, self.detok)
        skip = [h.sent for h in live]  # a replay resends nothing a client already has
        it = iter(gen)
        try:
            for d in it:
                h = live[d.row]
                if h.cancelled or h.done:
                    if all(x.cancelled or x.done for x in live):
                        break  # nobody is listening: stop the batch now
                    continue
                res = gen.results[d.row]
                toks, lps = list(d.tokens), d.logprobs
                tops = res.top_logprobs[-len(toks):] if res.top_logprobs is not None and toks else None
                n = min(skip[d.row], len(toks))
                skip[d.row] -= n
                toks, lps, tops = toks[n:], (lps[n:] if lps else lps), (tops[n:] if tops else tops)
                if toks or d.finish_reason:
                    self._send(h, Out(toks, lps, tops, d.finish_reason))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        st = getattr(gen, "stats", None)
        if st is not None:
            self.drafted += st.drafted
            self.accepted += st.accepted
            self.metrics.speculative(st.drafted, st.accepted)
        for h, res in zip(live, gen.results):  # rows that ended without a delta (max_tokens 0)
            if not h.done and not h.cancelled:
                self._send(h, Out([], finish_reason=res.finish_reason or "length"))

    # ---- the continuous-batching scheduler (submit / cancel / step)
    def _work_continuous(self) -> None:
        eng = self.engine
        self._held = []
        while True:
            self._flush()
            with self._lock:
                while not self._waiting and not self._running and not self._cancels and not self._stop:
                    self._lock.wait()
                if self._stop:
                    for h in list(self._running.values()):
                        eng.cancel(h.rid)
                    return
                cancels, self._cancels = self._cancels, []
                new = []
                while self._waiting and len(self._running) < self.max_num_seqs:
                    h = self._waiting.popleft()
                    self._running[h.rid] = h
                    new.append(h)
                self._gauges()
            for h in cancels:
                if self._running.pop(h.rid, None) is not None:
                    eng.cancel(h.rid)
                h.done = True
            for h in new:
                try:
                    if self.fault is not None:
                        self.fault([h])
                    eng.submit(h.prompt_ids, h.params, request_id=h.rid, **self._submit_kw())
                except Exception as e:  # a request the engine refuses ends alone
                    self._running.pop(h.rid, None)
                    self._send(h, Out([], error=f"{type(e).__name__}: {e}"))
            if not self._running:
                continue
            for d in eng.step():
                h = self._running.get(d.request_id)
                if h is None or h.cancelled:
                    continue
                fin = d.finish_reason if d.finished else None
                if d.finished and fin is None and d.error is None:
                    fin = "stop"
                self._send(h, Out(list(d.token_ids), d.logprobs, getattr(d, "top_logprobs", None), fin,
                                  getattr(d, "error", None)))
                if h.done:
                    with self._lock:
                        self._running.pop(h.rid, None)
                        self._gauges()
            self._engine_stats()

    def _submit_kw(self) -> dict:
        return {}

    def _engine_stats(self) -> None:
        st = getattr(self.engine, "stats", None)
        if st is None:
            return
        s = st()
        get = s.get if isinstance(s, dict) else (lambda k, d=None: getattr(s, k, d))
        drafted, accepted = get("drafted", 0) or 0, get("accepted", 0) or 0
        self.metrics.speculative(drafted - self.drafted, accepted - self.accepted)
        self.drafted, self.accepted = drafted, accepted
        used = get("kv_use", None)
        if used is not None:
            self.metrics.kv_use.set(used)
        if get("running", None) is not None:  # the engine's own view: decoding + prefilling, queued in it
            with self._lock:
                self.metrics.running.set(get("running", 0) + (get("prefilling", 0) or 0))
                self.metrics.waiting.set(len(self._waiting) + (get("waiting", 0) or 0))
