"""Many sandboxed runs at once: `Pool` (submit as they come) and `run_many` (a batch, in order).

A thread pool over `run()`: each worker thread starts one sandbox process and waits in epoll, so
threads cost nothing while programs run; the sandboxes share nothing (each has its own namespaces,
work dir and limits). A run whose sandbox failed transiently (`SandboxError.transient`: a fork or
namespace creation refused for lack of resources) is retried with a short back-off, never reported
as the program's failure; a permanent failure, or a transient one that outlasts the retries,
raises. `run_many` returns the results in job order with the batch's wall time and executions/s.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Mapping

from mellum2.sandbox.execute import Result, run
from mellum2.sandbox.isolate import SandboxError

RETRIES = 3
BACKOFF_S = 0.05


def run_retrying(code: str, retries: int = RETRIES, **kw) -> Result:
    """`run()` with transient sandbox failures retried (back-off 0.05, 0.1, 0.2 s)."""
    for attempt in range(retries + 1):
        try:
            return run(code, **kw)
        except SandboxError as e:
            if not e.transient or attempt == retries:
                raise
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


class Results(list):
    """The results of a batch, in job order, with `wall_s` and `per_s` (executions per second)."""

    wall_s: float = 0.0

    @property
    def per_s(self) -> float:
        return len(self) / self.wall_s if self.wall_s > 0 else 0.0

    def statuses(self) -> Counter:
        return Counter(r.status for r in self)


def _job(job: str | Mapping) -> dict:
    """A job is the code, or a mapping of `run()` keyword arguments with "code"."""
    if isinstance(job, str):
        return {"code": job}
    if not isinstance(job, Mapping) or "code" not in job:
        raise TypeError(f"sandbox job {job!r:.80}: expected the code or a dict of run() arguments with 'code'")
    return dict(job)


class Pool:
    """`workers` sandboxes at a time (default: the number of CPUs). Use as a context manager or
    call close()."""

    def __init__(self, workers: int | None = None, retries: int = RETRIES):
        self.workers = workers or os.cpu_count() or 1
        self.retries = retries
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")

    def submit(self, code: str, **kw) -> Future:
        """Start one run as soon as a worker is free; the future's result is its `Result`."""
        return self._executor.submit(run_retrying, code, self.retries, **kw)

    def map(self, jobs: Iterable[str | Mapping]) -> Results:
        """Run every job; results in job order. Raises the first permanent SandboxError."""
        jobs = [_job(j) for j in jobs]
        t0 = time.perf_counter()
        futures = [self.submit(**j) for j in jobs]
        try:
            out = Results(f.result() for f in futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        out.wall_s = time.perf_counter() - t0
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_many(jobs: Iterable[str | Mapping], workers: int | None = None, retries: int = RETRIES) -> Results:
    """Run many programs at once, `workers` at a time; results in job order, with `.wall_s` and
    `.per_s` (executions per second). A job is the code or a dict of `run()` arguments."""
    with Pool(workers, retries) as pool:
        return pool.map(jobs)
