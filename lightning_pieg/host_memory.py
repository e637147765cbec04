"""Host memory for the learner: let glibc's malloc keep large freed blocks for reuse instead of returning them.

glibc serves blocks above its mmap threshold (at most 32 MB) straight from the kernel and gives them back at free,
so every large tensor of an update (PIE-G's 250 MB head gradient and its bf16 copy, the trunk's activations) comes
as fresh pages that the kernel must fault in and zero, update after update. With mmap off for the heap's blocks and
the trim threshold at its maximum, freed blocks stay in the process and the next update reuses them. On the
project's 2-core CPU a PIE-G update at batch 32 took 0.77-0.95 s instead of 1.15-1.19 s in fp32, and 0.48-0.50 s
instead of 0.72-0.81 s in bf16 (docs/measurements.md). The cost: the process keeps its peak memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
MAX_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and keep freed memory; True when it took effect
    (False on other C libraries and systems, where nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # musl has a mallopt that does nothing and returns 0; glibc returns 1 on success
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, MAX_TRIM_THRESHOLD))
