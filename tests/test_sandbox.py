"""The sandbox's API: statuses, stdin/files, timings, run_many, backend choice and refusals, retries."""
import dataclasses
import os
import warnings

import pytest

from mellum2.errors import UsageError
from mellum2.sandbox import Pool, SandboxError, execute, isolate, pool, run, run_many, run_retrying
from mellum2.sandbox.isolate import Limits

pytestmark = pytest.mark.skipif(not isinstance(isolate._get("bwrap"), isolate.Backend),
                                reason="bubblewrap is not installed")


def test_statuses():
    r = run("print('hi')")
    assert (r.status, r.exit_code, r.stdout, r.stderr, r.ok) == ("ok", 0, "hi\n", "", True)
    r = run("import sys\nprint('partial')\nsys.exit(3)")
    assert (r.status, r.exit_code, r.stdout) == ("error", 3, "partial\n")
    r = run("raise ValueError('bad input')")
    assert r.status == "error" and r.exit_code == 1 and r.stderr.rstrip().endswith("ValueError: bad input")
    assert 'File "/sandbox/main.py", line 1' in r.stderr
    assert run("x = bytearray(1 << 40)").status == "memory"
    r = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (r.status, r.exit_code) == ("killed", -11)
    r = run("import time\ntime.sleep(30)", timeout_s=0.5)
    assert (r.status, r.exit_code) == ("timeout", -9) and 0.5 <= r.wall_s < 3
    r = run("print('y' * 100000)", output_bytes=10)
    assert r.status == "output_limit" and r.stdout == "y" * 10
    assert run("print('y' * 9)", output_bytes=10).stdout == "y" * 9 + "\n"
    assert run("print(1)\nexit(4)\nprint(2)").exit_code == 4   # site's exit() exists without site


def test_status_mapping():
    lim = Limits(cpu_s=2, memory_bytes=1 << 28)
    assert execute._status(None, -9, 2.0, lim, "") == "timeout"      # the CPU-seconds rlimit's SIGKILL
    assert execute._status(None, -24, 2.0, lim, "") == "timeout"     # its SIGXCPU
    assert execute._status(None, -9, 0.1, lim, "") == "killed"       # a SIGKILL from elsewhere
    assert execute._status(None, 1, 0.1, lim, "Traceback\nMemoryError\n") == "memory"
    assert execute._status(None, 1, 0.1, lim, "MemoryError\nValueError: x\n") == "error"
    assert execute._status("output_limit", 0, 0.1, lim, "") == "output_limit"


def test_stdin_files_and_times():
    r = run("import sys\nprint(sys.stdin.read().upper())", stdin="abc\ndef")
    assert r.stdout == "ABC\nDEF\n"
    big = "x" * (1 << 20)
    assert run("import sys\nprint(len(sys.stdin.read()))", stdin=big).stdout == f"{1 << 20}\n"
    r = run("import helper\nfrom pkg import mod\nprint(helper.X, mod.Y, open('data/d.txt').read())",
            files={"helper.py": "X = 1", "pkg/__init__.py": "", "pkg/mod.py": "Y = 2", "data/d.txt": b"bytes"})
    assert r.stdout == "1 2 bytes\n", r
    r = run("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass")
    assert r.ok and r.cpu_s >= 0.3 and r.wall_s >= r.cpu_s * 0.5
    r = run("import os, time\nif os.fork() == 0:\n    t = time.process_time()\n"
            "    while time.process_time() - t < 0.3:\n        pass\n    os._exit(0)\nos.wait()")
    assert r.ok and r.cpu_s >= 0.3   # children's CPU time counts
    r = run("import time\nt = time.process_time()\nwhile True:\n    pass", timeout_s=0.6)
    assert r.status == "timeout" and r.cpu_s > 0.1   # and so does that of a killed run


def test_bad_arguments():
    for kw in ({"language": "c"}, {"timeout_s": 0}, {"timeout_s": float("inf")}, {"memory_mb": 8},
               {"files": {"../x": ""}}, {"files": {"/etc/x": ""}}, {"files": {"main.py": ""}}):
        with pytest.raises(UsageError):
            run("pass", **kw)
    with pytest.raises(Exception, match="sandbox backend"):
        run("pass", backend="docker")


def test_run_many_in_order():
    jobs = [f"print({i} * {i})" for i in range(12)] + [{"code": "print(input())", "stdin": "z"}]
    rs = run_many(jobs, workers=4)
    assert [r.stdout for r in rs] == [f"{i * i}\n" for i in range(12)] + ["z\n"]
    assert rs.statuses() == {"ok": 13} and rs.wall_s > 0 and rs.per_s == pytest.approx(13 / rs.wall_s)
    with Pool(2) as p:
        futures = [p.submit("print(7)"), p.submit("while True: pass", timeout_s=0.3)]
        assert [f.result().status for f in futures] == ["ok", "timeout"]
    with pytest.raises(TypeError):
        run_many([{"stdin": "no code"}])


def test_transient_failures_are_retried(monkeypatch):
    calls = []
    real = pool.run

    def flaky(code, **kw):
        calls.append(code)
        if len(calls) == 1:
            raise SandboxError("bwrap: Creating new namespace failed: Resource temporarily unavailable", transient=True)
        return real(code, **kw)

    monkeypatch.setattr(pool, "run", flaky)
    assert run_retrying("print(5)").stdout == "5\n" and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(pool, "run", lambda code, **kw: calls.append(code) or (_ for _ in ()).throw(
        SandboxError("broken for good")))
    with pytest.raises(SandboxError, match="broken for good"):
        run_many(["pass"])
    assert len(calls) == 1   # a permanent failure is not retried


def test_sandbox_failure_before_start_is_not_the_programs(monkeypatch):
    box = isolate._get("bwrap")
    broken = dataclasses.replace(box, python="/nonexistent/python3")
    with pytest.raises(SandboxError, match="before the program started") as e:
        execute._run(broken, b"print(1)", b"", {}, Limits(5, 1 << 28), 5.0, 1 << 16)
    assert not e.value.transient


def test_refuses_without_isolation(monkeypatch):
    monkeypatch.setattr(isolate, "_backends", {"bwrap": "bwrap is not installed",
                                               "unshare": "unshare is not installed"})
    monkeypatch.setattr(isolate, "_warned", set())
    with pytest.raises(SandboxError, match="no isolation available.*bubblewrap"):
        run("print(1)")
    with pytest.warns(RuntimeWarning, match="UNCONFINED"):
        r = run("print(1)", allow_unconfined=True)
    assert r.stdout == "1\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # said once, not on every run
        assert run("print(2)", allow_unconfined=True).stdout == "2\n"


def test_falls_back_to_unshare_with_one_warning(monkeypatch):
    if not isinstance(isolate._get("unshare"), isolate.Backend):
        pytest.skip("unshare cannot create namespaces here")
    monkeypatch.setattr(isolate, "_backends", {"bwrap": "bwrap is not installed",
                                               "unshare": isolate._get("unshare")})
    monkeypatch.setattr(isolate, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falling back to unshare.*no filesystem isolation"):
        assert run("print(1)").stdout == "1\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run("print(2)").stdout == "2\n"


def test_switches_to_an_unprivileged_uid_without_setpriv():
    box = isolate._get("bwrap")
    if box.user is None:
        pytest.skip("not root: nothing to switch")
    plain = dataclasses.replace(box, setpriv=None)   # Popen(user=...) instead
    code = "import os\nprint(os.getuid(), open('/proc/self/uid_map').read().split())"
    r = execute._run(plain, code.encode(), b"", {}, Limits(5, 1 << 28), 5.0, 1 << 16)
    assert r.ok and r.stdout.startswith("65534 ")
    assert os.geteuid() == 0   # the caller keeps its own uid
