"""The engine in a process of its own (`mellum2 serve`'s default): the HTTP side and the engine no
longer take turns on one interpreter lock.

In one process the event loop's per-token Python (a delta to its stream, incremental detokenization,
an SSE chunk, uvicorn's write) and the engine thread's op dispatch run one at a time under the GIL:
under 32 streams the engine thread was on the CPU 92% of the run and the server as a whole used one
core. As vLLM's engine core process, the engine here runs in a child process, and `ProcessEngine` is
its stand-in with the scheduler's API (`submit`, `cancel`, `step`, `stats`), so backend.py drives it
unchanged. Submissions and cancellations go to the child as they come; the child steps on its own
while it has work, taking whatever has arrived before each step, and sends each step's deltas with
the engine's stats; `step()` returns the results that have arrived (waiting, without the GIL, for the
next one). So the engine never waits for the HTTP side, which only has to keep up.

The child loads the checkpoint itself (nothing large crosses the pipe) and builds the one Engine the
in-process server would (`server.make_engine`, the same options). A submission the engine refuses
comes back as that request's error delta; if the child dies, `step()` raises and the backend ends
every request with the error. The parent holds a weightless copy of the model (on the meta device)
for what the HTTP side reads: the config and whether there is an MTP head.
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import torch

from mellum2.infer.request import Delta


class EngineProcessError(RuntimeError):
    """The engine process could not start or has stopped."""


class ProcessEngine:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype, tokenizer_dir: str | Path, options: dict,
                 threads: int | None = None, start_timeout: float = 600.0):
        """options: the serving options of `server.engine_options` (max_num_seqs, max_model_len, ...);
        the child resolves their defaults against the loaded model (the draft vocabulary from
        model_dir), as the in-process server does."""
        ctx = mp.get_context("spawn")  # no fork of a process that already runs threads (uvicorn, torch)
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, name="mellum2-engine", daemon=True,
                                args=(child, str(model_dir), dtype, str(tokenizer_dir), dict(options), threads))
        self.proc.start()
        child.close()
        if not self._conn.poll(start_timeout):
            self.close()
            raise EngineProcessError(f"the engine process did not load {model_dir} in {start_timeout:.0f} s")
        msg = self._recv()
        if msg[0] != "ready":
            self.close()
            raise EngineProcessError(f"the engine process could not start: {msg[1]}")
        _, self.cfg, self.has_mtp, self.speculative = msg
        self._submits: list = []
        self._cancels: list = []
        self._stats: dict = {}

    def model_stub(self):
        """A Mellum2 without weights (meta device) with the served model's config and MTP head."""
        from mellum2.model.transformer import Mellum2

        cfg = self.cfg if self.has_mtp else self.cfg.replace(num_nextn_predict_layers=0)
        with torch.device("meta"):
            return Mellum2(cfg)

    # ------------------------------------------------------------------ the scheduler's API
    def submit(self, prompt_ids, params, request_id: str) -> str:
        self._send(("submit", list(prompt_ids), params, request_id))
        return request_id

    def cancel(self, request_id: str) -> None:
        self._send(("cancel", request_id))

    def step(self) -> list[Delta]:
        """The deltas of the child's next step (it steps on its own while it has work: this waits
        for the next result, or returns one that is already there)."""
        deltas = []
        while True:  # the next step's result, and any that queued up behind it
            msg = self._recv()
            if msg[0] != "step":
                raise EngineProcessError(f"the engine process failed: {msg[1]}")
            deltas += msg[1]
            self._stats = msg[2]
            if not self._conn.poll():
                return deltas

    def alive(self) -> bool:
        """Whether the engine process is running (the server's /health asks)."""
        return self.proc.is_alive()

    def stats(self) -> dict:
        """The engine's stats as of the last step."""
        return self._stats

    def close(self) -> None:
        try:
            self._conn.send(("close",))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self._conn.close()

    def _send(self, msg) -> None:
        try:
            self._conn.send(msg)
        except (OSError, ValueError) as e:
            raise EngineProcessError(f"the engine process has stopped ({type(e).__name__}: {e})") from None

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError) as e:
            code = self.proc.exitcode
            raise EngineProcessError(f"the engine process has stopped (exit code {code}; "
                                     f"{type(e).__name__})") from None


def _child(conn, model_dir: str, dtype: torch.dtype, tokenizer_dir: str, options: dict, threads: int | None) -> None:
    from mellum2.model.transformer import load_pretrained
    from mellum2.tokenizer import Tokenizer

    from .server import engine_options, make_engine

    try:
        if threads:
            torch.set_num_threads(threads)
        model = load_pretrained(model_dir, dtype=dtype)
        tok = Tokenizer.load(tokenizer_dir)
        eng = make_engine(model, detokenize=tok.decode, **engine_options(model, model_dir=model_dir, **options))
        conn.send(("ready", model.cfg, model.mtp is not None, bool(eng.speculative)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which names it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    refused: list[Delta] = []

    def apply(msg) -> bool:
        if msg[0] == "close":
            return False
        if msg[0] == "submit":
            _, prompt, params, rid = msg
            try:
                eng.submit(prompt, params, request_id=rid)
            except Exception as e:  # noqa: BLE001 - a request the engine refuses ends alone
                refused.append(Delta(rid, [], finished=True, error=f"{type(e).__name__}: {e}"))
        elif msg[0] == "cancel":
            eng.cancel(msg[1])
        return True

    while True:
        try:
            # with work: take what has arrived and step on; without: wait for the next message
            while not (eng.has_work() or refused) or conn.poll():
                if not apply(conn.recv()):
                    return
            out, refused[:] = list(refused), []
            if eng.has_work():
                out += eng.step()
            conn.send(("step", out, eng.stats()))
        except (EOFError, OSError):
            return  # the server went away
        except BaseException as e:  # noqa: BLE001 - the engine itself failed: tell the parent, then stop
            try:
                conn.send(("error", f"{type(e).__name__}: {e}"))
            finally:
                return
