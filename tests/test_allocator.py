"""mellum2.allocator: freed large tensors are reused instead of faulted in again (glibc only)."""
import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, torch
from mellum2.allocator import keep_freed_memory
on = keep_freed_memory()
def faults_of_one_step():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 << 18).fill_(1.0)  # 64 MiB of fp32, touched
    y = x * 2.0                           # another 64 MiB
    del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
faults_of_one_step()  # first time: the heap grows, faults are expected
print(on, min(faults_of_one_step() for _ in range(3)))
"""


def probe(env_extra):
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    on, faults = out.stdout.split()
    return on == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_tensors_are_reused_without_page_faults():
    on, faults = probe({})
    if not on:
        pytest.skip("not glibc: keep_freed_memory() does not apply")
    pages = 2 * (64 << 20) // 4096  # 32,768 pages per step
    assert faults < pages // 20, faults
    off, faults_default = probe({"MELLUM2_MALLOC": "default"})
    assert not off
    assert faults_default > pages // 2, faults_default  # glibc's defaults: every step faults again


def test_unknown_setting_is_named_and_the_default_used():
    env = {**os.environ, "MELLUM2_MALLOC": "bogus"}
    r = subprocess.run([sys.executable, "-c", "from mellum2.allocator import keep_freed_memory; keep_freed_memory()"],
                       capture_output=True, text=True, env=env, check=True)
    assert "MELLUM2_MALLOC='bogus'" in r.stderr and "'keep'" in r.stderr
