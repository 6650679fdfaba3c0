"""Hostile programs against the sandbox: each must be contained, get the right status, leave no
process running and write nothing outside its work dir. The filesystem cases need bubblewrap (CI
installs it); the process, network and environment cases also run on the unshare fallback."""
import os
import secrets
import socket
import warnings

import pytest

from mellum2.sandbox import isolate, run

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELUDE_MARK = "import resource as R,posix,sys,builtins"   # in every sandboxed interpreter's cmdline


def _available(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            isolate.backend(name)
            return True
        except isolate.SandboxError:
            return False


BWRAP = pytest.mark.skipif(not _available("bwrap"), reason="bubblewrap is not installed")
BACKENDS = [pytest.param("bwrap", marks=BWRAP),
            pytest.param("unshare", marks=pytest.mark.skipif(not _available("unshare"), reason="no unshare"))]


@pytest.fixture(autouse=True)
def _quiet_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def leftovers(token=""):
    """pids of processes still running a sandboxed interpreter, or with `token` on the command line."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if PRELUDE_MARK in cmd or (token and token in cmd):
            out.append((int(name), cmd[:120]))
    return out


def contained(result, status, token=""):
    assert result.status == status, result
    assert leftovers(token) == [], "processes left running"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_bomb_is_capped_and_killed(backend):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    contained(run(bomb, timeout_s=1.5, backend=backend), "timeout")
    # RLIMIT_NPROC is counted per sandbox: forking stops below it, and the sleepers die with the run
    count = ("import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n"
             "        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n    n += 1\nprint(n)\n")
    r = run(count, timeout_s=10, backend=backend)
    contained(r, "ok")
    assert 0 < int(r.stdout) < isolate.Limits(1, 1).procs


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bomb(backend):
    contained(run("x = bytearray(1 << 36)", memory_mb=256, backend=backend), "memory")
    # many processes, each under the per-process limit: the sandbox's total is what counts
    spread = ("import os, time\nfor i in range(12):\n    if os.fork() == 0:\n        x = bytearray(100 << 20)\n"
              "        x[::4096] = b'1' * len(x[::4096])\n        time.sleep(60)\nos.wait()\n")
    r = run(spread, memory_mb=256, timeout_s=20, backend=backend)
    contained(r, "memory")
    assert r.wall_s < 10
    grow = "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))\n"
    r = run(grow, memory_mb=128, timeout_s=10, backend=backend)
    contained(r, "memory")
    assert "MemoryError" in r.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_loop_and_ignored_sigterm(backend):
    r = run("while True:\n    pass\n", timeout_s=1, backend=backend)
    contained(r, "timeout")
    assert 1 <= r.wall_s < 3 and r.exit_code == -9 and r.cpu_s > 0.1
    stubborn = ("import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
                "    signal.signal(s, signal.SIG_IGN)\nsignal.pthread_sigmask(signal.SIG_BLOCK, range(1, 32))\n"
                "while True:\n    pass\n")
    contained(run(stubborn, timeout_s=1, backend=backend), "timeout")


@pytest.mark.parametrize("backend", BACKENDS)
def test_child_that_outlives_its_parent(backend):
    token = secrets.token_hex(8)
    code = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{token}'])\n"
            "    os._exit(0)\nos.wait()\nprint('parent done')\n")
    r = run(code, timeout_s=10, backend=backend)
    contained(r, "ok", token)
    assert r.wall_s < 5   # returns when the parent exits, not when the daemon would
    # setsid in the program itself, then hang: the wall clock still kills it
    contained(run("import os\nos.setsid()\nwhile True:\n    pass\n", timeout_s=1, backend=backend), "timeout")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gigabytes_of_output(backend):
    for stream in ("stdout", "stderr"):
        r = run(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 65536)\n", timeout_s=20, backend=backend)
        contained(r, "output_limit")
        assert len(getattr(r, stream)) == 64 << 10 and r.wall_s < 10


@BWRAP
def test_disk_is_capped():
    code = "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n"
    r = run(code, timeout_s=20)
    contained(r, "error")
    assert "File too large" in r.stderr or "No space left" in r.stderr
    many = "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1\n"
    r = run(many, timeout_s=20)
    contained(r, "error")
    assert "No space left" in r.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_network_is_unreachable(backend):
    token = secrets.token_hex(8)
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        tcp.setblocking(False)
        unix.bind(f"\0mellum2-test-{token}")
        unix.listen()
        unix.setblocking(False)
        port = tcp.getsockname()[1]
        code = ("import socket\nfor family, addr in ((socket.AF_INET, ('127.0.0.1', %d)), (socket.AF_INET, ('1.1.1.1', 53)),\n"
                "                     (socket.AF_UNIX, '\\0mellum2-test-%s')):\n"
                "    s = socket.socket(family)\n    s.settimeout(2)\n    try:\n        s.connect(addr)\n"
                "        print('CONNECTED', addr)\n    except OSError as e:\n        print('blocked', type(e).__name__)\n"
                % (port, token))
        r = run(code, timeout_s=10, backend=backend)
        contained(r, "ok")
        assert "CONNECTED" not in r.stdout and r.stdout.count("blocked") == 3
        for listener in (tcp, unix):
            with pytest.raises(BlockingIOError):
                listener.accept()


@BWRAP
def test_writes_outside_the_work_dir_stay_inside(tmp_path):
    token = secrets.token_hex(8)
    home = os.path.expanduser("~")
    targets = [f"/tmp/{token}", f"{PROJECT}/{token}", f"{tmp_path}/{token}", f"/root/{token}",
               f"{home}/{token}", f"/dev/shm/{token}", f"/var/tmp/{token}", f"/{token}", f"/usr/{token}",
               f"/etc/{token}", f"/dev/{token}", f"/proc/1/root/{token}"]
    code = ("import os\nfor p in %r + [os.path.expanduser('~/%s')]:\n    try:\n"
            "        os.makedirs(os.path.dirname(p), exist_ok=True)\n        open(p, 'w').write('x')\n"
            "        print('wrote', p)\n    except OSError as e:\n        print('refused', p, type(e).__name__)\n"
            % (targets, token))
    r = run(code)
    contained(r, "ok")
    for path in targets:
        assert not os.path.exists(path), path
    # what did succeed landed in the work dir (a tmpfs that /tmp and HOME point to), and died with it
    wrote = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("wrote")]
    assert f"/sandbox/{token}" in wrote and f"/tmp/{token}" in wrote
    assert all(p.startswith(("/sandbox/", "/tmp/")) for p in wrote), wrote


@pytest.mark.parametrize("backend", BACKENDS)
def test_parent_environment_and_secrets_are_invisible(backend, monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(12)
    monkeypatch.setenv("MELLUM2_TEST_SECRET", secret)
    code = ("import os\nprint(dict(os.environ))\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
            "        for f in ('environ', 'cmdline'):\n            try:\n"
            "                print(open(f'/proc/{pid}/{f}', 'rb').read())\n            except OSError as e:\n"
            "                print(pid, f, type(e).__name__)\n")
    r = run(code, backend=backend)
    contained(r, "ok")
    assert secret not in r.stdout and "MELLUM2_TEST_SECRET" not in r.stdout
    env = eval(r.stdout.splitlines()[0])
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "PWD"}


@BWRAP
def test_project_files_unreachable_through_proc(tmp_path):
    secret = "s3cr3t-" + secrets.token_hex(12)
    (tmp_path / "secret.txt").write_text(secret)
    me = os.getpid()
    paths = [f"{tmp_path}/secret.txt", f"{PROJECT}/README.md", f"{PROJECT}/tests/{os.path.basename(__file__)}"]
    via = [f"/proc/{pid}/{link}{p}" for pid in (1, 2, 3, me, os.getppid(), "self", "thread-self")
           for link in ("root", "cwd/..") for p in paths]
    code = ("import os\nfor p in %r:\n    try:\n        print('READ:', p, open(p).read()[:200])\n"
            "    except OSError as e:\n        print('refused', p, type(e).__name__)\n"
            "print(sorted(x for x in os.listdir('/proc') if x.isdigit()))\n"
            "print(os.listdir('/'), os.path.exists('/work'), os.path.exists(%r))\n" % (paths + via, PROJECT))
    r = run(code)
    contained(r, "ok")
    assert "READ:" not in r.stdout and secret not in r.stdout
    *_, pids, fs = r.stdout.splitlines()
    assert eval(pids) == ["1", "2"]   # the sandbox's init and the program: no host process is visible
    assert fs.endswith("False False")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deep_recursion(backend):
    r = run("def f(n):\n    return f(n + 1)\nf(0)\n", backend=backend)
    contained(r, "error")
    assert "RecursionError" in r.stderr
    # with the limit lifted, recursion in C overflows the stack (SIGSEGV); in Python it hits the
    # address-space limit (MemoryError, or CPython's allocation failure surfacing as another error)
    c_deep = "import sys\nsys.setrecursionlimit(10 ** 8)\na = []\nfor _ in range(10 ** 6):\n    a = [a]\nrepr(a)\n"
    r = run(c_deep, timeout_s=20, backend=backend)
    contained(r, "killed")
    assert r.exit_code == -11
    py_deep = "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)\n"
    r = run(py_deep, timeout_s=20, memory_mb=128, backend=backend)
    assert r.status in ("memory", "error", "killed") and r.wall_s < 15
    contained(r, r.status)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rlimits_cannot_be_raised(backend):
    code = ("import resource as R\nfor name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_NPROC', 'RLIMIT_FSIZE', "
            "'RLIMIT_NOFILE', 'RLIMIT_CORE'):\n    k = getattr(R, name)\n    soft, hard = R.getrlimit(k)\n"
            "    try:\n        R.setrlimit(k, (R.RLIM_INFINITY, R.RLIM_INFINITY))\n        print('RAISED', name)\n"
            "    except (ValueError, OSError):\n        print(name, soft, hard)\n")
    r = run(code, timeout_s=3, memory_mb=300, backend=backend)
    contained(r, "ok")
    assert "RAISED" not in r.stdout
    got = {line.split()[0]: (int(line.split()[1]), int(line.split()[2])) for line in r.stdout.splitlines()}
    assert got["RLIMIT_AS"] == (300 << 20, 300 << 20) and got["RLIMIT_CPU"] == (3, 3)
    assert got["RLIMIT_CORE"] == (0, 0) and got["RLIMIT_NPROC"][1] <= 32


@BWRAP
def test_no_root_powers():
    token = secrets.token_hex(8)
    code = ("import os, ctypes\nst = open('/proc/self/status').read()\n"
            "print([l for l in st.splitlines() if l.startswith(('Uid', 'Cap', 'NoNewPrivs'))])\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print('unshare', libc.unshare(0x10000000), 'chroot', libc.chroot(b'/sandbox'))\n"
            "try:\n    os.kill(1, 9)\nexcept OSError as e:\n    print('kill1', type(e).__name__)\n"
            "import subprocess, sys\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', '{token}'])\n"
            "print('child', p.pid, flush=True)\nimport time\ntime.sleep(30)\n")
    import threading
    seen = {}

    def watch():   # while it sleeps, look at the sandbox's processes from the host
        import time
        for _ in range(200):
            pids = [p for p, cmd in leftovers(token) if token in cmd]   # the sandbox's own child
            if pids:
                seen["status"] = open(f"/proc/{pids[0]}/status").read()
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch)
    t.start()
    r = run(code, timeout_s=2)
    t.join()
    contained(r, "timeout", token)
    lines = eval(r.stdout.splitlines()[0])
    assert any(l.split()[1:] == ["65534"] * 4 for l in lines if l.startswith("Uid"))
    assert all(l.split()[1] == "0000000000000000" for l in lines if l.startswith("Cap"))
    assert "NoNewPrivs:\t1" in lines
    assert "unshare -1 chroot -1" in r.stdout   # no new user namespace, no chroot
    host_uid = [l for l in seen["status"].splitlines() if l.startswith("Uid")][0].split()[1:]
    assert "0" not in host_uid   # not root on the host either (switched to nobody before bwrap)
