"""``host_memory.keep_freed_memory``: after it, rounds of large allocations (an update's pattern: blocks above
glibc's 32 MB mmap ceiling, allocated and freed every round) reuse freed memory instead of faulting in fresh pages."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc malloc's")

ROUNDS = 10
PROBE = f"""
import resource, sys
import torch
from lightning_pieg.host_memory import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit("keep_freed_memory() did not take effect")
MB = 2**20 // 4  # float32 elements

def one_round():
    a = torch.empty(64 * MB).fill_(1)
    b = torch.empty(40 * MB).fill_(2)
    c = a[: 40 * MB] + b  # a temporary, as an update makes
    del a
    d = torch.empty(48 * MB).fill_(3)
    del b, c, d

for _ in range({ROUNDS}):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    one_round()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
ROUND_PAGES = (64 + 40 + 40 + 48) * 2**20 // 4096  # fresh 4 KiB pages one round touches when nothing is reused


def page_faults_per_round(mode: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [int(line) for line in done.stdout.split()]


def test_freed_blocks_are_reused_without_page_faults():
    fresh = page_faults_per_round("default")
    if min(fresh[-3:]) < ROUND_PAGES // 2:  # e.g. transparent huge pages for every allocation: 2 MiB faults
        pytest.skip(f"this machine's default already faults few pages per round ({fresh}): nothing to compare")
    kept = page_faults_per_round("keep")
    assert sum(kept[-3:]) < 0.01 * ROUND_PAGES, kept  # the last rounds run in memory the process already has
