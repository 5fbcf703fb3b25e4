"""Process memory tuning for services that move large buffers."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, looked up once (find_library runs ldconfig); None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_large_buffers_to_the_os(threshold: int = 4 << 20, keep: int = 3 << 20) -> bool:
    """glibc raises its mmap threshold each time a large block is freed (up to
    32 MiB), after which freed multi-megabyte buffers stay in the heap and the
    resident size grows with every migration.  A fixed threshold keeps blocks
    above it in their own mappings, returned on free.  4 MiB keeps 1 MiB
    message buffers in the heap: mapping each one anew costs page faults that
    halve stream throughput (benchmarks/driver_bench.py (a)).

    A fixed mmap threshold also fixes glibc's trim threshold, at 128 KiB: each
    1 MiB message freed at the top of the heap went back to the OS and the
    next one faulted its pages in again (a quarter of the driver's CPU in a
    stop-copy stream).  The heap keeps up to `keep` bytes free at its top
    instead: the two copies of a 1 MiB message in flight (the driver's answer,
    gRPC's copy of it) and some.  False where glibc is not in use."""
    libc = _libc()
    try:
        return (
            libc is not None
            and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
            and bool(libc.mallopt(M_TRIM_THRESHOLD, keep))
        )
    except AttributeError:
        return False


def return_free_memory_to_the_os() -> bool:
    """malloc_trim(0): give the free pages of every malloc arena back to the
    OS.  glibc shrinks an arena only from its top, so what a burst of
    migrations freed below a live block stays resident (the gRPC threads'
    arenas are ~90% free after a soak).  ~0.3 ms: for when a burst ends.
    False where glibc is not in use."""
    libc = _libc()
    try:
        return libc is not None and bool(libc.malloc_trim(0))
    except AttributeError:
        return False
