"""How a sandboxed program is started: the isolation backend, the interpreter inside, the prelude.

Backends, strongest first (docs/sandbox.md has the threat model):

- `bwrap` (bubblewrap): new user, pid, net, ipc, uts (and cgroup, where possible) namespaces; no
  further user namespaces inside (`--disable-userns`); all capabilities dropped; a read-only view of
  /usr, the top-level /bin, /lib* links and /etc/ld.so.cache (plus the interpreter's prefix when it
  lies outside /usr); a fresh /proc of the new pid namespace; a read-only /dev with the usual nodes;
  the work dir `/sandbox` a size-capped tmpfs (also reachable as /tmp) that the program and its
  `files` are copied into from memory; the root read-only; nothing else of the host (no home, no
  project); an empty environment plus PATH, HOME, TMPDIR and LANG; `--die-with-parent`,
  `--new-session`.
- `unshare` (util-linux), the fallback where bubblewrap is missing: new user, pid, net, ipc, uts and
  mount namespaces with a fresh /proc, a fresh host temp dir as the work dir. No filesystem view of
  its own: the program can read and write what its uid can. A warning says so, once.
- `none`: rlimits and a process group only; used only when the caller passes `allow_unconfined`.

Every backend runs the program under an unprivileged uid: when the caller is root, the launcher
switches to `nobody` before starting bubblewrap, so that the sandbox's processes are not root on
the host (root is exempt from RLIMIT_NPROC and owns every root file of the read-only view).

Inside, the interpreter runs as `python -I -S -B -X utf8 -c PRELUDE`: isolated mode (no environment
variables, no user site, no script dir or cwd on sys.path), no `site` (faster start-up; no
site-packages, so only the standard library is importable), no bytecode written. The prelude lowers
the soft and hard rlimits (CPU seconds, address space, processes, file size, open files, core 0),
reports "started" on a pipe the launcher watches, restores the `exit`/`quit` builtins that `site`
would have added, and executes `main.py` from the work dir as `__main__`. The interpreter is the
caller's own (the installation behind the venv, `sys.base_prefix`), bound read-only at its own path;
when the caller is root and that installation is not readable by `nobody` (e.g. under /root), the
system `python3` in /usr/bin is used instead.
"""
from __future__ import annotations

import functools
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field

from mellum2.errors import MellumError

WORKDIR = "/sandbox"
NOBODY = 65534
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
PYTHON_FLAGS = ("-I", "-S", "-B", "-X", "utf8")


class SandboxError(MellumError, RuntimeError):
    """The sandbox itself failed (not the program in it). `transient`: worth retrying
    (fork or namespace creation hit a temporary resource shortage)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Limits:
    """Per-run resource limits, applied with setrlimit inside the sandbox before the program runs."""

    cpu_s: int                 # RLIMIT_CPU, per process (SIGKILL when reached)
    memory_bytes: int          # RLIMIT_AS, per process
    procs: int = 32            # RLIMIT_NPROC: processes and threads of the sandbox's uid
    files: int = 256           # RLIMIT_NOFILE
    disk_bytes: int = 64 << 20  # the work dir tmpfs (bwrap) and RLIMIT_FSIZE

    def prelude(self, start_fd: int) -> str:
        """The Python source run by `-c` inside the sandbox. After the limits and the "started" byte
        it forks: the parent stays as the sandbox's init (pid 1 of its pid namespace under bwrap
        and unshare), reaps every process and exits with the program's status (128+N when signal N
        killed it); the child runs main.py with ordinary signal semantics (a pid 1 would ignore
        signals it has no handler for). The launcher thereby reaps the init itself, which makes the
        CPU time of every process of the run visible to it, and the init's exit empties the
        namespace before the launcher returns."""
        # The "started" byte comes from the program's process right before main.py runs: a failure
        # before it (fork, a missing work dir) is the sandbox's, never the program's.
        limits = (f"(R.RLIMIT_CPU,{self.cpu_s}),(R.RLIMIT_AS,{self.memory_bytes}),"
                  f"(R.RLIMIT_NPROC,{self.procs}),(R.RLIMIT_FSIZE,{self.disk_bytes}),"
                  f"(R.RLIMIT_NOFILE,{self.files}),(R.RLIMIT_CORE,0)")
        return (
            "import resource as R,posix,sys,builtins\n"
            f"for k,v in ({limits}):\n"
            " h=R.getrlimit(k)[1];v=v if h<0 else min(v,h);R.setrlimit(k,(v,v))\n"
            "p=posix.fork()\n"
            "if p:\n"
            f" posix.close({start_fd})\n"
            " while 1:\n"
            "  q,s=posix.waitpid(-1,0)\n"
            "  if q==p:posix._exit(posix.WEXITSTATUS(s) if posix.WIFEXITED(s) else 128+posix.WTERMSIG(s))\n"
            "builtins.exit=builtins.quit=sys.exit\n"
            "sys.argv=['main.py'];sys.path.insert(0,posix.getcwd())\n"
            "__file__=posix.getcwd()+'/main.py'\n"
            f"posix.write({start_fd},b'1');posix.close({start_fd})\n"
            "del R,k,v,h,p,posix,sys,builtins\n"
            "exec(compile(open(__file__,'rb').read(),__file__,'exec'))\n"
        )


@dataclass
class Launch:
    """One prepared start: what to exec, with which fds, and what to clean up afterwards."""

    argv: list[str]
    pass_fds: list[int]           # the launcher's pipe ends and `own`
    own: list[int] = field(default_factory=list)  # memfds made for this run, closed by cleanup()
    cwd: str | None = None
    env: dict = field(default_factory=dict)
    user: int | None = None
    tmpdir: str | None = None

    def close_fds(self) -> None:
        """Once the launcher has started, it holds its own copies of the memfds."""
        for fd in self.own:
            os.close(fd)
        self.own = []

    def cleanup(self) -> None:
        self.close_fds()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


@dataclass(frozen=True)
class Backend:
    name: str                   # "bwrap" | "unshare" | "none"
    tool: str | None            # path of bwrap / unshare
    python: str                 # interpreter, at the same path inside the sandbox
    prefix_bind: str | None     # its installation, bound read-only when outside /usr
    user: int | None            # host uid to switch to before starting (set when the caller is root)
    features: frozenset = frozenset()  # optional bwrap flags this bwrap knows
    setpriv: str | None = None  # util-linux setpriv, to switch to `user` (see _start)

    def _start(self, argv: list[str]) -> tuple[list[str], int | None]:
        """(argv, uid for Popen) that start `argv` as `user`. setpriv in front of the command keeps
        subprocess on vfork: a Popen that changes uid must fork() the caller, which copies the page
        tables of a trainer holding a model (~10 ms a run with torch imported, more with weights)."""
        if self.user is None:
            return argv, None
        if self.setpriv:
            return [self.setpriv, f"--reuid={self.user}", f"--regid={self.user}", "--clear-groups", *argv], None
        return argv, self.user

    def launch(self, code: bytes, files: dict[str, bytes], limits: Limits, start_fd: int,
               info_fd: int | None) -> Launch:
        """Build the command for one run. `start_fd`/`info_fd`: write ends of the launcher's pipes
        (the prelude's "started" byte; bwrap's JSON with the sandbox init's host pid)."""
        python = [self.python, *PYTHON_FLAGS, "-c", limits.prelude(start_fd)]
        if self.name == "bwrap":
            return self._bwrap(code, files, limits, start_fd, info_fd, python)
        tmp = tempfile.mkdtemp(prefix="mellum2-sandbox-")
        out = Launch(argv=[], pass_fds=[start_fd], cwd=tmp, tmpdir=tmp, env=dict(ENV, HOME=tmp, TMPDIR=tmp))
        for name, data in {"main.py": code, **files}.items():
            path = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        if self.user is not None:
            for root, dirs, names in os.walk(tmp):
                for n in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, x) for x in names)]:
                    os.chown(n, self.user, self.user)
        if self.name == "unshare":
            python = [self.tool, "--user", "--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts",
                      "--mount", "--mount-proc", f"--wd={tmp}", *python]
        out.argv, out.user = self._start(python)
        return out

    def _bwrap(self, code, files, limits, start_fd, info_fd, python) -> Launch:
        own = []
        argv = [self.tool, "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY),
                "--unshare-pid", "--as-pid-1", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--hostname", "sandbox", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        if "--disable-userns" in self.features:
            argv.append("--disable-userns")
        argv += _system_binds()
        if self.prefix_bind:
            argv += ["--ro-bind", self.prefix_bind, self.prefix_bind]
        argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
        if "--size" in self.features:
            argv += ["--size", str(limits.disk_bytes)]
        argv += ["--tmpfs", WORKDIR, "--symlink", WORKDIR, "/tmp"]
        made = {WORKDIR}
        for name, data in {"main.py": code, **files}.items():
            path = f"{WORKDIR}/{name}"
            parent = os.path.dirname(path)
            missing = []
            while parent not in made:
                missing.append(parent)
                made.add(parent)
                parent = os.path.dirname(parent)
            for d in reversed(missing):
                argv += ["--dir", d]
            fd = _memfd(data)
            own.append(fd)
            argv += ["--file", str(fd), path]
        argv += ["--remount-ro", "/", "--chdir", WORKDIR, "--clearenv"]
        for k, v in dict(ENV, HOME=WORKDIR, TMPDIR=WORKDIR).items():
            argv += ["--setenv", k, v]
        argv += ["--info-fd", str(info_fd), *python]
        argv, user = self._start(argv)
        return Launch(argv=argv, pass_fds=[start_fd, info_fd, *own], own=own, user=user)


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("sandbox", os.MFD_CLOEXEC)
    os.write(fd, data) if len(data) < (1 << 16) else _write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@functools.lru_cache(maxsize=1)
def _system_binds() -> tuple[str, ...]:
    """/usr read-only, the top-level /bin, /sbin, /lib* as the host has them (merged-/usr links or
    directories), and the dynamic linker's cache."""
    out = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            out += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            out += ["--ro-bind", path, path]
    if os.path.exists("/etc/ld.so.cache"):
        out += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return tuple(out)


def _world_reachable(path: str) -> bool:
    """Can any uid reach `path` (every parent searchable by others, the file readable by others)?"""
    path = os.path.realpath(path)
    if not os.access(path, os.F_OK) or not os.stat(path).st_mode & stat.S_IROTH:
        return False
    parent = os.path.dirname(path)
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def _interpreter(root: bool) -> tuple[str, str | None]:
    """(interpreter path, read-only bind for its installation or None when it is under /usr)."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.join(prefix, "bin", version)
    if not os.path.isfile(exe):
        exe = os.path.realpath(sys.executable)
    if root and not (_world_reachable(exe) and _world_reachable(os.path.join(prefix, "lib", version, "os.py"))):
        system = shutil.which("python3", path="/usr/bin:/bin")
        if system is None:
            raise SandboxError(f"the interpreter {exe} is not readable by an unprivileged user and there "
                               "is no /usr/bin/python3 to run sandboxed programs with")
        exe, prefix = os.path.realpath(system), "/usr"
    under_usr = exe.startswith("/usr/") and prefix.startswith("/usr")
    return exe, None if under_usr else prefix


def _unprivileged() -> int | None:
    """The host uid to switch to before starting a sandbox: nobody when we are root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return NOBODY


def _bwrap_features(tool: str) -> frozenset:
    text = subprocess.run([tool, "--help"], capture_output=True, text=True).stdout
    return frozenset(f for f in ("--disable-userns", "--size") if f in text)


def _probe(backend: Backend) -> str | None:
    """Start one trivial program through `backend`; None when it worked, else why not."""
    r, w = os.pipe()
    info_r, info_w = os.pipe()
    launch = backend.launch(b"", {}, Limits(cpu_s=5, memory_bytes=256 << 20), w, info_w)
    try:
        p = subprocess.run(launch.argv, pass_fds=launch.pass_fds, cwd=launch.cwd, env=launch.env,
                           user=launch.user, group=launch.user, extra_groups=[] if launch.user is not None else None,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    finally:
        launch.cleanup()
        for fd in (w, info_w, info_r):
            os.close(fd)
    started = os.read(r, 1)
    os.close(r)
    if p.returncode == 0 and started == b"1":
        return None
    return (p.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {p.returncode}"])[-1]


_lock = threading.Lock()
_backends: dict[str, Backend | str] = {}   # name -> Backend, or why it is unavailable
_warned: set[str] = set()


def _make(name: str) -> Backend | str:
    user = _unprivileged()
    tool = None
    if name != "none":
        tool = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if tool is None:
            return f"{name} is not installed"
    try:
        python, prefix = _interpreter(user is not None)
    except SandboxError as e:
        return str(e)
    features = _bwrap_features(tool) if name == "bwrap" else frozenset()
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin") if user is not None else None
    backend = Backend(name, tool, python, prefix, user, features, setpriv)
    why = _probe(backend)
    return backend if why is None else f"{name} failed to start a program: {why}"


def _get(name: str) -> Backend | str:
    with _lock:
        if name not in _backends:
            _backends[name] = _make(name)
        return _backends[name]


def _warn_once(name: str, message: str) -> None:
    with _lock:
        if name in _warned:
            return
        _warned.add(name)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def backend(name: str = "auto", allow_unconfined: bool = False) -> Backend:
    """The isolation backend for a run: "auto" takes bwrap, else unshare (with a warning, once), else
    refuses unless `allow_unconfined`; "bwrap"/"unshare" insist on that one. Probed once per process."""
    if name not in ("auto", "bwrap", "unshare"):
        raise MellumError(f"sandbox backend {name!r}: expected 'auto', 'bwrap' or 'unshare'")
    order = ["bwrap", "unshare"] if name == "auto" else [name]
    reasons = []
    for n in order:
        b = _get(n)
        if isinstance(b, Backend):
            if n == "unshare":
                _warn_once("unshare", "sandbox: bubblewrap unavailable (" + "; ".join(reasons or ["not asked for"])
                           + "); falling back to unshare + rlimits: new user/pid/net/ipc/uts namespaces, but no "
                           "filesystem isolation (the program can read and write what uid "
                           f"{b.user if b.user is not None else os.geteuid()} can). Install bubblewrap "
                           "(apt-get install bubblewrap).")
            return b
        reasons.append(b)
    if not allow_unconfined:
        raise SandboxError("sandbox: no isolation available (" + "; ".join(reasons) + "). Install bubblewrap "
                           "(apt-get install bubblewrap), or pass allow_unconfined=True to run with rlimits only")
    b = _get("none")
    if isinstance(b, str):
        raise SandboxError(f"sandbox: cannot start the interpreter at all: {b}")
    _warn_once("none", "sandbox: running UNCONFINED (rlimits and a process group only): " + "; ".join(reasons))
    return b
