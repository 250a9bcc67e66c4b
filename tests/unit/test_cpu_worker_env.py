"""platform.cpu_worker_env: the allocator settings CPU ranks and engines start with, and that
glibc honours them (a freed large tensor stays in the process for the next step)."""

from __future__ import annotations

import os
import subprocess
import sys

from megatron_spin.platform import cpu_worker_env

MMAP, TRIM = "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"


def test_both_thresholds_are_set_by_their_own_variables():
    env = cpu_worker_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert sorted(env) == [MMAP, TRIM] and all(int(v) >= 2**32 for v in env.values())
    assert all(":" not in v for v in env.values())  # Ray's runtime_env splits values at ':'


def test_a_setting_the_user_made_is_left_alone():
    assert sorted(cpu_worker_env({MMAP: "65536"})) == [TRIM]
    assert sorted(cpu_worker_env({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})) == [MMAP]
    assert cpu_worker_env({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.malloc.mmap_threshold=2"}) == {}


PROBE = """
import torch
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
x = torch.ones(64 * 1024 * 1024)  # 256 MiB, touched
before = rss()
del x
print(before - rss())
"""


def _freed_bytes(extra_env: dict) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", MMAP, TRIM)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **extra_env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return int(out.stdout.split()[-1])


def test_glibc_keeps_a_freed_large_tensor_for_reuse():
    """Without the settings glibc unmaps a 256 MiB tensor when it is freed (the next step faults
    its pages in again); with them the memory stays in the process."""
    assert _freed_bytes({}) > 200 * 2**20
    assert _freed_bytes(cpu_worker_env({})) < 16 * 2**20
