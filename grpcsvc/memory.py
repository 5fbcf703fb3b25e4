"""Process memory tuning for services that move large buffers."""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3


def return_large_buffers_to_the_os(threshold: int = 4 << 20) -> bool:
    """glibc raises its mmap threshold each time a large block is freed (up to
    32 MiB), after which freed multi-megabyte buffers stay in the heap and the
    resident size grows with every migration.  A fixed threshold keeps blocks
    above it in their own mappings, returned on free.  4 MiB keeps 1 MiB
    message buffers in the heap: mapping each one anew costs page faults that
    halve stream throughput (benchmarks/driver_bench.py (a)).  False where
    glibc is not in use."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
