"""The inference engine: token ids in, a stream of tokens out. One engine for the CLI, evaluation,
RL rollouts and the server; tokenizer-agnostic (stop strings come through a detokenize callback).

A call: validate the requests, allocate a KVCache for the batch (kvcache.py), prefill all prompts in
one right-padded forward, then decode: one token per row per step (plain), or 1..k+1 tokens per row
per step with MTP self-speculation (speculative.py). Each row has its own SamplingParams, stop
tokens/strings and token budget; a finished row stops advancing (it is computed but frozen until the
whole batch is done; continuous batching would refill its slot: the cache's per-row positions
already allow a new prompt in one row).

What runs on the device per step is `Fast`/`Reference` forward + sampling, with static shapes and no
host syncs; the loop then copies the step's tokens to the host once (streaming and stop checks need
them). `Engine(compile=True)` compiles the plain decode step, and the whole greedy speculative step
(verify, accept, MTP, next drafts), with torch.compile over a static cache.

Follows nanochat's Engine (one engine shared by chat/eval/RL) and gpt-fast (static cache, compiled
step, speculative decoding as one function).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from mellum2.model.transformer import Mellum2

from .forward import Fast, Reference, _one_row_gemms
from .kvcache import KVCache
from .sampling import Sampler, SamplingParams
from .speculative import draft, gather_rows, verify

NO_MTP_NOTICE = ("this checkpoint has no MTP head (num_nextn_predict_layers=0): speculative decoding is off, "
                 "generating normally. `mellum2 train-mtp --model DIR` trains a head for it.")


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
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
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"
    stop: int | str | None = None  # what matched
    stats: Stats = field(default_factory=Stats)  # of the whole call (shared by a batch's rows)


@dataclass
class Delta:
    """New tokens of one row in one step (streaming)."""
    row: int
    tokens: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None


class _Row:
    """Host-side state of one request: emitted tokens, stop matching, budget."""

    def __init__(self, params: SamplingParams, eos_ids, detok):
        self.p, self.res = params, Result()
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.detok = detok
        self.tail = max((len(s) for s in params.stop), default=0) * 4 + 4  # tokens that can hold a stop string
        if params.logprobs:
            self.res.logprobs = []
        if params.top_logprobs:
            self.res.top_logprobs = []
        self.done = params.max_new_tokens == 0
        if self.done:
            self.res.finish_reason = "length"

    def push(self, toks: list[int], lps=None, tops=None) -> list[int]:
        """Append tokens until a stop or the budget; returns what was appended."""
        out = []
        for i, t in enumerate(toks):
            if self.done:
                break
            out.append(t)
            self.res.tokens.append(t)
            if self.res.logprobs is not None:
                self.res.logprobs.append(lps[i])
            if self.res.top_logprobs is not None:
                self.res.top_logprobs.append(tops[i][: self.p.top_logprobs])
            if t in self.stop_ids:
                self.done, self.res.finish_reason, self.res.stop = True, "stop", t
            elif self.p.stop and self._stop_string():
                self.done, self.res.finish_reason = True, "stop"
            elif len(self.res.tokens) >= self.p.max_new_tokens:
                self.done, self.res.finish_reason = True, "length"
        return out

    def _stop_string(self) -> bool:
        """A stop string that ends in the text of the newest token (decoding only a short tail)."""
        tail = self.res.tokens[-self.tail:]
        now, before = self.detok(tail), self.detok(tail[:-1])
        for s in self.p.stop:
            if s in now and s not in before:
                self.res.stop = s
                return True
        return False


class Engine:
    """Batched, streaming generation over a Mellum2 model (see the module docstring).

    fast: the decode fast path (forward.Fast) instead of the model's own trunk code (Reference).
    prefill_chunk: prompts are prefilled this many positions at a time.
    compile: torch.compile the plain decode step and the greedy speculative step over a static cache
    of the model's full context (CPU: inductor's C++ wrapper; CUDA: mode="reduce-overhead", a CUDA
    graph); the MoE then takes the sync-free `gather` path. On this CPU 1.6-1.9x the eager decode
    after a 10-20 s compile per graph (docs/inference.md "Compiled steps")."""

    def __init__(self, model: Mellum2, fast: bool = True, compile: bool = False, moe: str = "auto",
                 draft_vocab=None, prefill_chunk: int = 1024):
        if not isinstance(model, Mellum2):
            raise TypeError(f"Engine: expected a mellum2 Mellum2 model, got {type(model).__name__}")
        if prefill_chunk < 1:
            raise ValueError(f"Engine: prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model = model  # no train/eval switch: Mellum2 has no dropout, and RL callers keep their mode
        self.cfg = model.cfg
        self.fwd = Fast(model, moe) if fast else Reference(model)
        if draft_vocab is not None:
            self.set_draft_vocab(draft_vocab)
        self._versions = self._weight_versions()
        self.compile = compile
        self.compile_s = 0.0  # seconds spent compiling steps so far
        self._compiled: dict = {}  # ("plain", hi) / ("spec", k, hi) -> a compiled step over the static cache
        self._static_cache: KVCache | None = None

    @property
    def device(self):
        return self.model.lm_head.weight.device

    @property
    def dtype(self):
        return self.model.lm_head.weight.dtype

    @property
    def has_mtp(self) -> bool:
        return self.model.mtp is not None

    def _weight_versions(self) -> tuple:
        """In-place updates (optimizer steps, load_state_dict) bump tensor versions, `.to()` makes new
        tensors: the fast path re-reads the weights when this key changes."""
        w = self.model.lm_head.weight
        ps = list(self.model.parameters())
        return sum(p._version for p in ps), len(ps), id(self.model.mtp), w.dtype, w.device, w.data_ptr()

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
        self._compiled = {}  # compiled speculative steps traced the old draft head

    # ------------------------------------------------------------------ public
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 speculative: bool = False, draft_tokens: int = 1, detokenize: Callable | None = None) -> list[Result]:
        run = self.stream(prompts, params, speculative, draft_tokens, detokenize)
        for _ in run:
            pass
        return run.results

    def stream(self, prompts, params=None, speculative: bool = False, draft_tokens: int = 1,
               detokenize: Callable | None = None) -> "Generation":
        """An iterable of Delta (tokens per row per step); `.results` / `.stats` once exhausted."""
        return Generation(self, prompts, params, speculative, draft_tokens, detokenize)

    # ------------------------------------------------------------------ internals
    def _check(self, prompts, params, speculative, draft_tokens, detokenize):
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("generate: no prompts given")
        V = self.cfg.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt {i} is empty (give at least one token, e.g. the bos id)")
            bad = [t for t in p if not 0 <= t < V]
            if bad:
                raise ValueError(f"generate: prompt {i} has token ids outside the vocabulary [0, {V}): {bad[:5]}")
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        if any(p.stop for p in params) and detokenize is None:
            raise ValueError("generate: stop strings need a detokenize callback (ids -> str); the engine is "
                             "tokenizer-agnostic")
        if draft_tokens < 1:
            raise ValueError(f"generate: draft_tokens must be >= 1, got {draft_tokens}")
        need = max(map(len, prompts)) + max(p.max_new_tokens for p in params)
        if need > self.cfg.max_position_embeddings:
            raise ValueError(f"generate: prompt ({max(map(len, prompts))} tokens) + max_new_tokens exceeds the "
                             f"model's max_position_embeddings={self.cfg.max_position_embeddings}")
        return prompts, params

    def _cache(self, B, capacity, k1, mtp):
        cap = self.cfg.max_position_embeddings
        if self.compile and isinstance(self.fwd, Fast) and capacity <= cap:
            c = self._static_cache
            # one static cache serves every call it is big enough for (a plain step runs on a cache
            # built for k drafts and the MTP layer), so alternating calls do not recompile
            if c is None or (c.batch, c.dtype) != (B, self.dtype) or c.step_tokens < k1 or (mtp and not c.has_mtp):
                if c is not None and (c.batch, c.dtype) == (B, self.dtype):
                    k1, mtp = max(k1, c.step_tokens), mtp or c.has_mtp
                c = self._static_cache = KVCache(self.cfg, B, cap, self.dtype, self.device, step_tokens=k1, mtp=mtp)
                self._compiled = {}
            c.reset()
            return c
        return KVCache(self.cfg, B, capacity, self.dtype, self.device, step_tokens=k1, mtp=mtp)

    def _compile(self, fn):
        if self.device.type == "cuda":
            return torch.compile(fn, dynamic=False, fullgraph=True, mode="reduce-overhead")
        # a C++ wrapper calls the kernels: no Python per kernel (1.2x the Python wrapper here)
        return torch.compile(fn, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})

    def _decode_fn(self, cache):
        """The plain decode step (trunk + head on one token per row); compiled when asked."""
        fwd = self.fwd
        if not self.compile or cache is not self._static_cache:
            return lambda ids, pos, hi: fwd.head(fwd.trunk(ids, pos, cache, hi=hi))
        one_row = isinstance(fwd, Fast) and fwd._bf16_cpu and cache.batch == 1

        def make(hi):  # the step for one context bucket (a host int: static in the graph)
            def step(ids, pos):
                return fwd.head(fwd.trunk(ids, pos, cache, hi=hi))
            return step

        def run(ids, pos, hi):
            hb = _bucket(hi, cache.capacity)
            with _one_row_gemms(one_row):
                return self._step(("plain", hb), lambda: make(hb), ids, pos)
        return run

    def _spec_fn(self, cache, k: int):
        """The greedy speculative step as one compiled graph over the static cache (None when not
        compiling): verify [x_n, d_1..d_k], accept while drafts equal the trunk's argmax, the MTP
        layer over all k+1 positions (the eager loop runs it over the accepted ones only; the rest
        are rewritten before any query can see them), then the next k drafts. No host sync inside:
        the host reads the emitted tokens and the accepted counts once per step."""
        if not self.compile or cache is not self._static_cache:
            return None
        fwd = self.fwd

        def make(hi):  # the step for one context bucket (a host int: static in the graph)
            def step(tok_B1, drafts_Bk, n_B, active_B):
                pos_BT = n_B[:, None] + torch.arange(k + 1, device=n_B.device)
                h_BTD = fwd.trunk(torch.cat([tok_B1, drafts_Bk], 1), pos_BT, cache, hi=hi)
                logits_BTV = fwd.head(h_BTD)
                out_BT, m_B, _ = verify(None, logits_BTV, drafts_Bk, None)
                y_BD = fwd.mtp(h_BTD, out_BT, pos_BT, cache, hi=hi, pick_B=m_B)[:, 0]
                tok_B = gather_rows(out_BT, m_B)
                n_B = n_B + (m_B + 1) * active_B.long()
                drafts_Bk, _ = draft(fwd, None, cache, y_BD, tok_B, n_B, k, hi=hi)
                return out_BT, m_B, logits_BTV, tok_B[:, None], drafts_Bk, n_B
            return step

        def run(tok_B1, drafts_Bk, n_B, active_B, hi):
            # past the last position a draft of this step writes (verify's hi + k + 1, as the eager loop)
            hb = _bucket(hi + k + 1, cache.capacity)
            return self._step(("spec", k, hb), lambda: make(hb), tok_B1, drafts_Bk, n_B, active_B)
        return run

    def _step(self, key, build, *args):
        """Call the compiled step `key`, compiling build() at its first call. Every context bucket
        recompiles the same Python function, so the first call lifts dynamo's per-function
        recompile limit (8), which a long context's dozen buckets would exceed."""
        if self.device.type == "cuda":  # a new CUDA-graph step: the previous step's outputs were consumed
            torch.compiler.cudagraph_mark_step_begin()
        fn = self._compiled.get(key)
        if fn is not None:
            return fn(*args)
        fn = self._compiled[key] = self._compile(build())
        t0 = time.perf_counter()
        with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096):
            out = fn(*args)
        self.compile_s += time.perf_counter() - t0  # compiling (one step's run is noise next to it)
        return out


def _bucket(hi: int, capacity: int) -> int:
    """The compiled steps attend over the first `bucket` slots of the full layers: hi rounded up to a
    power of two (at least 128), at most the capacity, so a few graphs cover every context length
    and a short context does not pay for attending over the whole static cache."""
    b = 128
    while b < hi:
        b *= 2
    return min(b, capacity)


class Generation:
    """One generate call as an iterator of Delta; results and stats when done."""

    def __init__(self, engine: Engine, prompts, params, speculative, draft_tokens, detokenize):
        self.engine = engine
        self.prompts, self.params = engine._check(prompts, params, speculative, draft_tokens, detokenize)
        self.stats = Stats(prompt_tokens=sum(map(len, self.prompts)))
        self.k = draft_tokens
        self.speculative = bool(speculative)
        if self.speculative and not engine.has_mtp:
            self.speculative = False
            self.stats.notice = NO_MTP_NOTICE
            warnings.warn(f"mellum2: {NO_MTP_NOTICE}", stacklevel=3)
        self.stats.speculative = self.speculative
        self.stats.draft_tokens = self.k if self.speculative else 0
        self.rows = [_Row(p, engine.cfg.eos_ids, detokenize) for p in self.params]
        self.results = [r.res for r in self.rows]
        for r in self.results:
            r.stats = self.stats
        self._it = None

    def __iter__(self) -> Iterator[Delta]:
        if self._it is None:
            self._it = self._run()
        return self._it

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def _run(self) -> Iterator[Delta]:
        eng, prompts = self.engine, self.prompts
        if eng._weight_versions() != eng._versions:
            eng.fwd.refresh()
            eng.cfg = eng.model.cfg
            eng._versions = eng._weight_versions()
        dev, B = eng.device, len(prompts)
        k = self.k if self.speculative else 0
        lens = [len(p) for p in prompts]
        P = max(lens)
        # a row that ends inside an accepted block has advanced up to k positions past its budget and
        # keeps verifying k+1 tokens from there until the batch is done
        capacity = P + max(p.max_new_tokens for p in self.params) + 2 * k + 1
        cache = eng._cache(B, capacity, k + 1, self.speculative)
        sampler = Sampler(self.params, eng.cfg.vocab_size, dev, prompts)
        if all(r.done for r in self.rows):
            return

        # ---- prefill: right-padded prompts, per-row positions 0..len-1 (pads after: never seen),
        # in chunks so masks and activations stay bounded for long prompts
        t0 = time.perf_counter()
        ids_BT = torch.tensor([p + [p[-1]] * (P - len(p)) for p in prompts], device=dev)
        pos_BT = torch.arange(P, device=dev).expand(B, P)
        lens_B = torch.tensor(lens, device=dev)
        valid_BT = pos_BT < lens_B[:, None]
        C = eng.prefill_chunk
        h_BTD = torch.cat([eng.fwd.trunk(ids_BT[:, a:a + C], pos_BT[:, a:a + C], cache,
                                         valid_BT=valid_BT[:, a:a + C], hi=min(a + C, P))
                           for a in range(0, P, C)], 1)
        last_B = lens_B - 1
        logits_B1V = eng.fwd.head(gather_rows(h_BTD, last_B)[:, None])
        tok_B1 = sampler.sample(logits_B1V)
        sampler.observe(tok_B1)
        n_B = lens_B.clone()  # position of the newest token (sampled, not yet in the cache)
        n_host = list(lens)
        if self.speculative:
            # the MTP layer over the prompt: (h_t, x_{t+1}) for t < len, x_len the token just sampled
            next_BT = torch.cat([ids_BT[:, 1:], ids_BT[:, -1:]], 1).scatter(1, last_B[:, None], tok_B1)
            # (its MLP only at each row's last position, the one that drafts: the rest only fill the cache)
            y_BD = None
            for a in range(0, P, C):
                e = min(a + C, P)
                y = eng.fwd.mtp(h_BTD[:, a:e], next_BT[:, a:e], pos_BT[:, a:e], cache, hi=e,
                                pick_B=(last_B - a).clamp(0, e - a - 1))[:, 0]
                y_BD = y if y_BD is None else torch.where(((last_B >= a) & (last_B < e))[:, None], y, y_BD)
            drafts_Bk, q_BkV = draft(eng.fwd, sampler, cache, y_BD, tok_B1[:, 0], n_B, k, hi=P + k + 1)
        self.stats.prefill_s = time.perf_counter() - t0
        yield from self._emit(tok_B1, logits_B1V, sampler, [0] * B)
        first = self.stats.new_tokens
        active_B = torch.tensor([not r.done for r in self.rows], device=dev)

        # ---- decode
        t0, c0 = time.perf_counter(), eng.compile_s
        step = eng._decode_fn(cache)
        # greedy speculation without penalties compiles into one graph per step (see Engine._spec_fn)
        spec_step = eng._spec_fn(cache, k) if self.speculative and sampler.plain_greedy else None
        while not all(r.done for r in self.rows):
            hi = max(n_host) + k + 1
            if not self.speculative:
                logits_B1V = step(tok_B1, n_B[:, None], hi)
                tok_B1 = sampler.sample(logits_B1V)
                if sampler.penalties:
                    sampler.observe(tok_B1)
                n_B = n_B + active_B.long()
                m_host = [0] * B
                out_BT, logits_BTV = tok_B1, logits_B1V
            elif spec_step is not None:
                out_BT, m_B, logits_BTV, tok_B1, drafts_Bk, n_B = spec_step(tok_B1, drafts_Bk, n_B, active_B, hi)
                m_host = m_B.tolist()
            else:
                ids_BT = torch.cat([tok_B1, drafts_Bk], 1)
                pos_BT = n_B[:, None] + torch.arange(k + 1, device=dev)
                h_BTD = eng.fwd.trunk(ids_BT, pos_BT, cache, hi=hi)
                logits_BTV = eng.fwd.head(h_BTD)
                out_BT, m_B, _ = verify(sampler, logits_BTV, drafts_Bk, q_BkV)
                m_host = m_B.tolist()
                if sampler.penalties:
                    sampler.observe(out_BT, torch.arange(k + 1, device=dev) <= m_B[:, None])
                # the MTP layer catches up over the positions some row kept (later ones are rewritten)
                c = max(m_host) + 1
                y_BD = eng.fwd.mtp(h_BTD[:, :c], out_BT[:, :c], pos_BT[:, :c], cache, hi=hi, pick_B=m_B)[:, 0]
                tok_B1 = gather_rows(out_BT, m_B)[:, None]
                n_B = n_B + (m_B + 1) * active_B.long()
                drafts_Bk, q_BkV = draft(eng.fwd, sampler, cache, y_BD, tok_B1[:, 0], n_B, k, hi=hi + k + 1)
            if self.speculative:
                for b, r in enumerate(self.rows):
                    if not r.done:
                        self.stats.drafted += k
                        self.stats.accepted += m_host[b]
                        self.stats.verify_rows += 1
            self.stats.steps += 1
            was_done = [r.done for r in self.rows]
            yield from self._emit(out_BT, logits_BTV, sampler, m_host)
            for b, r in enumerate(self.rows):
                if not was_done[b]:
                    n_host[b] += m_host[b] + 1
            if any(r.done != d for r, d in zip(self.rows, was_done)):
                active_B = torch.tensor([not r.done for r in self.rows], device=dev)
        self.stats.decode_s = time.perf_counter() - t0
        self.stats.compile_s = eng.compile_s - c0
        self.stats.decode_tokens = self.stats.new_tokens - first

    def _emit(self, out_BT, logits_BTV, sampler: Sampler, m_host) -> Iterator[Delta]:
        """Copy a step's tokens to the host (the loop's one sync) and hand them to the rows."""
        toks = out_BT.tolist()
        lps = tops = None
        if sampler.want_logprobs:
            chosen, top = sampler.logprobs(logits_BTV, out_BT)
            lps = chosen.tolist()
            if top is not None:
                tv, ti = top.values.tolist(), top.indices.tolist()
                tops = [[list(zip(ti[b][j], tv[b][j])) for j in range(len(ti[b]))] for b in range(len(ti))]
        for b, r in enumerate(self.rows):
            if r.done:
                continue
            n = m_host[b] + 1
            got = r.push(toks[b][:n], lps[b][:n] if lps else None, tops[b][:n] if tops else None)
            self.stats.new_tokens += len(got)
            if got:
                yield Delta(b, got, r.res.logprobs[-len(got):] if r.res.logprobs is not None else None,
                            r.res.finish_reason if r.done else None)


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
