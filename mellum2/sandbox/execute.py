"""`run()`: one untrusted program in a fresh sandbox, watched until everything it started is gone.

The launcher starts the backend's command (isolate.py) with stdin from a memfd, stdout and stderr
on pipes, and two more pipes: the prelude writes one byte on `start` once the rlimits are in place
(so a failure before it is the sandbox's, raised as `SandboxError`, and never the program's), and
bwrap writes the host pid of the sandbox's init on `info`. One epoll loop reads the output (each
stream capped; the first byte over the cap kills the run: `output_limit`), watches the wall clock
(`timeout`), checks the memory of the whole sandbox every 0.1 s once it has run 0.2 s (the
address-space rlimit is per process, so 32 processes could otherwise hold 32 times `memory_mb`)
and waits for the launcher to exit (a pidfd). A kill is SIGKILL to the sandbox's init:
the kernel then kills every process of its pid namespace, double-forked daemons included, and
bwrap exits only after the namespace is empty; `run()` returns after that (it also waits for the
init's pidfd), so nothing the program started outlives the call.

Statuses: "ok" (exit 0), "error" (any other exit), "memory" (the last stderr line is a MemoryError:
the address-space limit; or the sandbox's processes together held more than `memory_mb`), "timeout" (the wall clock, or the CPU-seconds limit: SIGKILL/SIGXCPU with
the CPU time at the limit), "killed" (any other signal), "output_limit" (stdout or stderr over the
cap). bwrap reports a program killed by signal N as exit status 128+N; those are mapped back to
-N (subprocess's convention), so a program that itself exits with 129..192 reads as killed.
"""
from __future__ import annotations

import errno
import math
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

from mellum2.errors import UsageError
from mellum2.sandbox.isolate import Backend, Limits, SandboxError, backend as get_backend

OUTPUT_BYTES = 64 << 10   # per stream
STATUSES = ("ok", "error", "timeout", "memory", "killed", "output_limit")
_TICKS = os.sysconf("SC_CLK_TCK")
_MEMORY_FIRST_S, _MEMORY_EVERY_S = 0.2, 0.1
_GONE_WAIT_S = 5.0         # after a kill, how long to wait for the namespace to empty
_TRANSIENT = ("Resource temporarily unavailable", "Cannot allocate memory", "No space left on device",
              "Too many open files", "Interrupted system call")


@dataclass
class Result:
    """What one run did. `exit_code` follows subprocess: negative = killed by that signal."""

    status: str
    exit_code: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float          # user + system time of every process of the sandbox (start-up included)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run(code: str, *, stdin: str | bytes = "", files: dict[str, str | bytes] | None = None,
        timeout_s: float = 10.0, memory_mb: int = 512, language: str = "python",
        output_bytes: int = OUTPUT_BYTES, backend: str = "auto", allow_unconfined: bool = False) -> Result:
    """Run `code` (a Python program, executed as `main.py` in the sandbox's work dir) in a fresh
    sandbox. `files`: relative path -> content, written next to it. `timeout_s`: wall clock;
    `memory_mb`: address space of each process, and memory of all of them together. Raises SandboxError when the sandbox itself fails
    (`.transient` says whether a retry may help); the program's own failures are statuses."""
    if language != "python":
        raise UsageError(f"sandbox language {language!r}: only 'python' is supported")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise UsageError(f"sandbox timeout_s={timeout_s!r}: expected a positive number of seconds")
    if not (isinstance(memory_mb, int) and memory_mb >= 32):
        raise UsageError(f"sandbox memory_mb={memory_mb!r}: expected an integer >= 32")
    files = {_check_name(k): v.encode() if isinstance(v, str) else bytes(v) for k, v in (files or {}).items()}
    limits = Limits(cpu_s=math.ceil(timeout_s), memory_bytes=memory_mb << 20)
    box = get_backend(backend, allow_unconfined)
    return _run(box, code.encode(), stdin.encode() if isinstance(stdin, str) else bytes(stdin), files,
                limits, timeout_s, output_bytes)


def _check_name(name: str) -> str:
    parts = name.split("/")
    if (not name or name.startswith("/") or "\0" in name or any(p in ("", ".", "..") for p in parts)
            or name == "main.py"):
        raise UsageError(f"sandbox file name {name!r}: expected a relative path without '..' (not main.py)")
    return name


def _run(box: Backend, code: bytes, stdin: bytes, files: dict, limits: Limits, timeout_s: float,
         cap: int) -> Result:
    start_r, start_w = os.pipe()
    info_r, info_w = os.pipe()
    stdin_fd = os.memfd_create("stdin", os.MFD_CLOEXEC) if stdin else None
    if stdin_fd is not None:
        os.write(stdin_fd, stdin) if len(stdin) < (1 << 16) else _write_all(stdin_fd, stdin)
        os.lseek(stdin_fd, 0, os.SEEK_SET)
    launch = None
    try:
        launch = box.launch(code, files, limits, start_w, info_w)
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                launch.argv, stdin=stdin_fd if stdin_fd is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=launch.pass_fds, cwd=launch.cwd,
                env=launch.env, start_new_session=True, user=launch.user, group=launch.user,
                extra_groups=[] if launch.user is not None else None)
        except OSError as e:
            raise SandboxError(f"sandbox: cannot start {launch.argv[0]}: {e}",
                               transient=e.errno in (errno.EAGAIN, errno.ENOMEM)) from e
        for fd in (start_w, info_w):
            os.close(fd)
        start_w = info_w = None
        launch.close_fds()
        return _watch(proc, box, start_r, info_r, limits, timeout_s, cap, t0)
    finally:
        for fd in (start_r, start_w, info_r, info_w, stdin_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if launch is not None:
            launch.cleanup()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _watch(proc: subprocess.Popen, box: Backend, start_r: int, info_r: int, limits: Limits,
           timeout_s: float, cap: int, t0: float) -> Result:
    sel = selectors.DefaultSelector()
    out, err, info = bytearray(), bytearray(), bytearray()
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, start_r: None, info_r: info}
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    try:
        exit_fd = os.pidfd_open(proc.pid)
        sel.register(exit_fd, selectors.EVENT_READ)
    except (AttributeError, OSError):   # kernels before 5.3: poll with waitid(WNOWAIT) instead
        exit_fd = None
    init_fd = None       # pidfd of the sandbox's init (bwrap), once its pid is known
    started = exited = False
    verdict = None       # "timeout" / "output_limit" when the launcher killed the run
    deadline = t0 + timeout_s
    next_check = t0 + _MEMORY_FIRST_S   # the whole sandbox's memory, checked while it runs
    give_up = None

    killed_cpu = 0.0     # CPU time of the processes alive when the launcher killed the run

    def kill(why: str) -> None:
        nonlocal verdict, give_up, init_fd, killed_cpu
        if verdict is None:
            verdict = why
            give_up = time.perf_counter() + _GONE_WAIT_S
        # A killed init's namespace is torn down without the usual reaping, which would lose the
        # CPU time of the processes still running: read it from /proc first.
        procs = _processes()
        tree = _tree(procs, proc.pid)
        killed_cpu = max(killed_cpu, sum(procs[p][1] for p in tree))
        if init_fd is None and info_r in streams:
            init_fd = _init_pidfd(_drain(info_r, info))
        if init_fd is None and box.name != "bwrap":   # the prelude's init: unshare's (or our) child
            init_fd = next((fd for fd in map(_pidfd, tree[1:2]) if fd is not None), None)
        try:
            if init_fd is not None:
                signal.pidfd_send_signal(init_fd, signal.SIGKILL)   # its pid namespace dies with it
        except ProcessLookupError:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if box.name == "none":   # no pid namespace: processes that left the group are hunted one by one
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    outputs = {proc.stdout.fileno(), proc.stderr.fileno()}
    try:
        while not (exited and not outputs & streams.keys()):
            now = time.perf_counter()
            if verdict is None and now >= deadline:
                kill("timeout")
            if verdict is None and now >= next_check:
                next_check = now + _MEMORY_EVERY_S
                if _resident(proc.pid) > limits.memory_bytes:
                    kill("memory")
            if give_up is not None and now >= give_up:
                break
            wait = (give_up if verdict else min(deadline, next_check)) - now
            if exit_fd is None:
                wait = min(wait, 0.01)
            for key, _ in sel.select(max(wait, 0)):
                fd = key.fd
                if fd == exit_fd:
                    exited = True
                    sel.unregister(fd)
                    continue
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if fd == start_r:
                    started = started or bool(data)
                elif streams[fd] is not None:
                    buf = streams[fd]
                    buf += data
                    if len(buf) > cap and fd != info_r:
                        del buf[cap:]
                        kill("output_limit")
                        data = b""   # stop reading: the writer is being killed
                if fd == info_r and not data and init_fd is None:
                    init_fd = _init_pidfd(info)
                if not data:
                    sel.unregister(fd)
                    del streams[fd]
            if exit_fd is None and not exited:
                exited = _exited(proc.pid)
        if not exited:
            kill(verdict or "timeout")
        if start_r in streams:
            started = started or bool(_drain(start_r, bytearray()))
        _, wstatus, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(wstatus)
        wall = time.perf_counter() - t0
        if init_fd is not None:   # bwrap's init leaves only once its pid namespace is empty
            sel_init = selectors.DefaultSelector()
            sel_init.register(init_fd, selectors.EVENT_READ)
            sel_init.select(_GONE_WAIT_S)
            sel_init.close()
    finally:
        sel.close()
        for fd in (exit_fd, init_fd):
            if fd is not None:
                os.close(fd)
        proc.stdout.close()
        proc.stderr.close()
    cpu = max(usage.ru_utime + usage.ru_stime, killed_cpu)
    stderr = err.decode(errors="replace")
    if not started and verdict != "output_limit":
        last = (stderr.strip().splitlines() or [f"exit status {rc}"])[-1]
        if verdict == "timeout":
            raise SandboxError(f"sandbox ({box.name}) did not start the program within {timeout_s} s", transient=True)
        raise SandboxError(f"sandbox ({box.name}) failed before the program started: {last}",
                           transient=any(t in stderr for t in _TRANSIENT))
    if 128 < rc <= 128 + 64:   # the prelude's init reports a program killed by signal N as 128+N
        rc = -(rc - 128)
    return Result(status=_status(verdict, rc, cpu, limits, stderr), exit_code=rc,
                  stdout=out.decode(errors="replace"), stderr=stderr, wall_s=wall, cpu_s=cpu)


def _status(verdict: str | None, rc: int, cpu: float, limits: Limits, stderr: str) -> str:
    if verdict:
        return verdict
    if rc == 0:
        return "ok"
    if rc in (-signal.SIGXCPU, -signal.SIGKILL) and cpu >= limits.cpu_s * 0.98:
        return "timeout"
    if rc == -signal.SIGXFSZ:
        return "output_limit"
    lines = stderr.rstrip().splitlines()
    if lines and lines[-1].startswith("MemoryError"):
        return "memory"
    return "killed" if rc < 0 else "error"


def _drain(fd: int, buf: bytearray) -> bytearray:
    try:
        while data := os.read(fd, 4096):
            buf += data
    except BlockingIOError:
        pass
    return buf


def _init_pidfd(info: bytearray) -> int | None:
    """bwrap's --info-fd JSON names the host pid of the sandbox's init ("child-pid")."""
    text = info.decode(errors="replace")
    key = '"child-pid":'
    if key not in text:
        return None
    digits = text.split(key, 1)[1].strip().split(",")[0].split("}")[0].strip()
    try:
        return os.pidfd_open(int(digits))
    except (ValueError, OSError, AttributeError):
        return None


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and its reaped children), from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(b")") + 2:].split()   # after "pid (comm) "
        out[int(name)] = int(fields[1]), sum(int(x) for x in fields[11:15]) / _TICKS
    return out


def _tree(procs: dict[int, tuple[int, float]], root: int) -> list[int]:
    """`root` and its live descendants."""
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        if pid in procs and pid not in out:
            out.append(pid)
            frontier += [c for c, (p, _) in procs.items() if p == pid]
    return out


def _resident(root: int) -> int:
    """Bytes of memory held by `root` and its descendants: the sum of their proportional set sizes
    (shared pages split between the sharers), via /proc/PID/task/PID/children where the kernel has
    it (CONFIG_PROC_CHILDREN), else a scan of /proc."""
    if os.path.exists(f"/proc/{root}/task/{root}/children"):
        pids, frontier = [], [root]
        while frontier:
            pid = frontier.pop()
            pids.append(pid)
            try:
                with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
                    frontier += map(int, f.read().split())
            except OSError:
                pass
    else:
        pids = _tree(_processes(), root)
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) << 10
                        break
        except OSError:
            pass
    return total


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def _exited(pid: int) -> bool:
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None
