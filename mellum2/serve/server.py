"""Putting a server together: a model directory -> engine, backend, state and app; uvicorn in the
foreground (`mellum2 serve`) or on a background thread (tests, the load benchmark).

The engine is mellum2's one Engine (mellum2/infer/engine.py). Keyword arguments the installed
Engine does not take (the scheduler's max_num_seqs / max_model_len) are left out, so the server
runs on the one-batch-per-call engine as well as on the continuous-batching scheduler.
"""
from __future__ import annotations

import inspect
import threading
import time

import uvicorn

from mellum2.infer import Engine

from .app import build_app
from .backend import Backend
from .common import ServeState


def make_engine(model, *, compile: bool = False, draft_vocab=None, max_num_seqs: int = 8,
                max_model_len: int | None = None, speculative: bool = False, draft_tokens: int = 1,
                prefix_cache_tokens: int = 0, detokenize=None, prefill_chunk: int | None = None) -> Engine:
    want = dict(compile=compile, draft_vocab=draft_vocab, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                speculative=speculative, draft_tokens=draft_tokens, prefix_cache_tokens=prefix_cache_tokens,
                detokenize=detokenize, prefill_chunk=prefill_chunk)
    takes = inspect.signature(Engine.__init__).parameters
    return Engine(model, **{k: v for k, v in want.items() if k in takes and v is not None})


def engine_options(model, *, max_num_seqs: int = 8, max_model_len: int | None = None, speculative: bool = False,
                   draft_tokens: int = 1, compile: bool = False, draft_vocab=None, prefix_cache_tokens: int | None = None,
                   prefill_chunk: int | None = None, model_dir=None) -> dict:
    """make_engine's options for serving `model`, defaults resolved: max_model_len (None: the model's
    context), prefix_cache_tokens (None: 4 full contexts; 0: off), speculative only with an MTP head,
    the draft vocabulary saved next to the checkpoint (model_dir) unless one is given."""
    cfg = model.cfg
    L = cfg.max_position_embeddings if max_model_len is None else max_model_len
    if not 1 <= L <= cfg.max_position_embeddings:
        raise ValueError(f"max_model_len must be in [1, {cfg.max_position_embeddings}] (the model's "
                         f"max_position_embeddings), got {L}")
    if draft_vocab is None and model_dir is not None and model.mtp is not None:
        from mellum2.locate import draft_vocab as load_draft_vocab
        draft_vocab = load_draft_vocab(model_dir)
    return dict(compile=compile, draft_vocab=draft_vocab, max_num_seqs=max_num_seqs, max_model_len=L,
                speculative=speculative and model.mtp is not None, draft_tokens=draft_tokens,
                prefix_cache_tokens=4 * L if prefix_cache_tokens is None else prefix_cache_tokens,
                prefill_chunk=prefill_chunk)


def make_state(model, tokenizer, *, name: str = "mellum2", api_key: str | None = None, max_num_seqs: int = 8,
               max_waiting: int = 64, max_model_len: int | None = None, speculative: bool = False,
               draft_tokens: int = 1, compile: bool = False, draft_vocab=None, mode: str = "auto",
               prefix_cache_tokens: int | None = None, prefill_chunk: int | None = None,
               engine=None) -> ServeState:
    """The server's state over a loaded model and tokenizer; the backend's worker is started.
    prefix_cache_tokens: prompt tokens the engine's prefix cache may hold (None: 4 full contexts;
    0: off). mode "static" serves on the engine's one-batch-per-call API even when it can schedule.
    engine: one built elsewhere (e.g. engine_process.ProcessEngine; `model` may then be its weightless
    stub)."""
    cfg = model.cfg
    opts = engine_options(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len, speculative=speculative,
                          draft_tokens=draft_tokens, compile=compile, draft_vocab=draft_vocab,
                          prefix_cache_tokens=prefix_cache_tokens, prefill_chunk=prefill_chunk)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size {cfg.vocab_size} is smaller than its tokenizer's "
                         f"{tokenizer.vocab_size}")
    if engine is None:
        engine = make_engine(model, detokenize=tokenizer.decode, **opts)
    backend = Backend(engine, tokenizer.decode, max_num_seqs=max_num_seqs, max_waiting=max_waiting,
                      speculative=opts["speculative"], draft_tokens=draft_tokens, mode=mode).start()
    return ServeState(backend, tokenizer, name, opts["max_model_len"], cfg.vocab_size, tuple(cfg.eos_ids), api_key)


class ThreadedServer:
    """uvicorn serving `app` on a background thread; port 0 picks a free port (`.port`, `.url`)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    lifespan="off", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="mellum2-uvicorn", daemon=True)
        self.host = host

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
