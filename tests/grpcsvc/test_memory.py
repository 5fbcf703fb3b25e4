"""grpcsvc.memory: the allocator settings of the services that move large
buffers (fwemu serve, vfio-driver serve)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from grpcsvc.memory import _libc

# In a fresh process: the heap's state is its own, and the settings stay there.
_FREED_1MIB_AT_THE_TOP = """
import ctypes, sys
from grpcsvc.memory import M_MMAP_THRESHOLD, _libc, return_large_buffers_to_the_os

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = _libc()
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":
    assert return_large_buffers_to_the_os()
else:
    assert libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)  # the mmap threshold alone
p = libc.malloc(1 << 20)
libc.free(p)
print(libc.mallinfo2().keepcost)  # free bytes the heap keeps at its top
"""


def _kept_at_the_top(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FREED_1MIB_AT_THE_TOP, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return int(out.stdout)


@pytest.mark.skipif(
    _libc() is None or not hasattr(_libc(), "mallinfo2"), reason="glibc >= 2.33 only"
)
def test_a_freed_message_buffer_stays_in_the_heap_for_the_next() -> None:
    """A fixed mmap threshold alone fixes glibc's trim threshold at 128 KiB:
    a freed 1 MiB message buffer at the top of the heap goes back to the OS
    and the next one faults its pages in again.  The services' settings keep
    it (up to 3 MiB free at the top)."""
    assert _kept_at_the_top("threshold-only") < 1 << 20
    assert _kept_at_the_top("tuned") >= 1 << 20
