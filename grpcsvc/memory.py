"""Process memory tuning for services that move large buffers."""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3


def return_large_buffers_to_the_os(threshold: int = 128 << 10) -> bool:
    """glibc raises its mmap threshold each time a large block is freed, after
    which megabyte-sized message buffers stay in the heap and the resident size
    creeps up with every migration.  A fixed threshold keeps them in their own
    mappings, returned to the OS on free.  False where glibc is not in use."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
