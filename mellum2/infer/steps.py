"""The engine's decode steps compiled with torch.compile (`Engine(compile=True)`): the plain step
(trunk + head, one token per row) and the greedy speculative step (`speculative.speculative_step`
with no sampler: verify, accept, the MTP layer, the next drafts, no host sync) as one graph each.

A graph is specialised to its rows of the KV pool (a view of rows a..b-1, whose tensors it captures)
and to a context bucket: full layers attend over the first `bucket(hi)` slots, a power of two, so a
few graphs cover every context length and a short context does not pay for the whole cache.
CPU: inductor with its C++ wrapper (no Python per kernel); CUDA: mode="reduce-overhead" (a CUDA
graph). As gpt-fast: static cache, compiled decode step.
"""
from __future__ import annotations

import time

import torch

from .forward import Fast, _one_row_gemms
from .speculative import speculative_step


def bucket(hi: int, capacity: int) -> int:
    """hi rounded up to a power of two (at least 128), at most the capacity."""
    b = 128
    while b < hi:
        b *= 2
    return min(b, capacity)


class CompiledSteps:
    def __init__(self, fwd, device):
        self.fwd, self.device = fwd, device
        self.graphs: dict = {}  # ("plain", a, b, bucket) / ("spec", k, a, b, bucket) -> a compiled step
        self.compile_s = 0.0  # seconds spent compiling so far

    def clear(self) -> None:
        self.graphs = {}

    def plain(self, view, a: int, ids_B1, pos_B1, hi: int):
        """Logits [B, 1, V] of one token per row at pos (rows a.. of the pool, `view`)."""
        fwd, hb = self.fwd, bucket(hi, view.capacity)

        def make():
            def step(ids, pos):
                return fwd.head(fwd.trunk(ids, pos, view, hi=hb))
            return step
        one_row = isinstance(fwd, Fast) and fwd._bf16_cpu and view.batch == 1
        with _one_row_gemms(one_row):  # (a no-op inside the trace: set around the compiled call)
            return self._call(("plain", a, a + view.batch, hb), view, make, ids_B1, pos_B1)

    def speculative(self, view, a: int, k: int, tok_B1, drafts_Bk, n_B, hi: int):
        """`speculative_step` for plain greedy rows; returns what it returns."""
        fwd, hb = self.fwd, bucket(hi + k + 1, view.capacity)

        def make():
            def step(tok_B1, drafts_Bk, n_B):
                return speculative_step(fwd, None, view, tok_B1, drafts_Bk, None, n_B, k, hb)
            return step
        return self._call(("spec", k, a, a + view.batch, hb), view, make, tok_B1, drafts_Bk, n_B)

    def _call(self, key, view, build, *args):
        """Call the compiled step `key`, compiling build() at its first call. Every row range and
        bucket recompiles the same Python function, so the first call lifts dynamo's per-function
        recompile limit (8)."""
        if self.device.type == "cuda":  # a new CUDA-graph step: the previous step's outputs were consumed
            torch.compiler.cudagraph_mark_step_begin()
        fn = self.graphs.get(key)
        if fn is not None:
            return fn(*args)
        view.mark_static()  # the cache it writes in place: static inputs, not "mutated inputs"
        fn = self.graphs[key] = self._compile(build())
        t0 = time.perf_counter()
        with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096):
            out = fn(*args)
        self.compile_s += time.perf_counter() - t0  # compiling (one step's run is noise next to it)
        return out

    def _compile(self, fn):
        if self.device.type == "cuda":
            return torch.compile(fn, dynamic=False, fullgraph=True, mode="reduce-overhead")
        # a C++ wrapper calls the kernels: no Python per kernel (1.2x the Python wrapper here)
        return torch.compile(fn, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
