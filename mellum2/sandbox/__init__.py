"""mellum2.sandbox: isolated execution of untrusted (model-written) programs.

`run(code, ...)` runs one Python program in a fresh bubblewrap sandbox with rlimits and a wall-clock
timeout and returns a `Result` (status, exit code, capped stdout/stderr, wall and CPU time);
`run_many(jobs, workers=...)` runs many at once (`Pool` for a stream of jobs). isolate.py builds
the sandbox, execute.py watches one run, pool.py runs many. docs/sandbox.md has the threat model.
"""
from mellum2.sandbox.execute import OUTPUT_BYTES, STATUSES, Result, run
from mellum2.sandbox.isolate import SandboxError, backend
from mellum2.sandbox.pool import Pool, Results, run_many, run_retrying

__all__ = ["run", "run_many", "run_retrying", "Pool", "Result", "Results", "SandboxError", "backend",
           "STATUSES", "OUTPUT_BYTES"]
