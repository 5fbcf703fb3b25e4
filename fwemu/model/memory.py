"""The firmware's memory: where VF state arenas get their pages (an allocator
that tests can make fail on demand) and the budget that bounds all the memory
the firmware holds (VF state, and host memory it holds for remote drivers).

A request that would go beyond the budget, or whose allocation fails, is
refused with OutOfMemory before anything changes.
"""

from __future__ import annotations

import mmap
import os

from ..link.ifc import FirmwareError, Syndrome


class OutOfMemory(FirmwareError):
    """Beyond the firmware's memory limit, or the allocation failed (ENOMEM).
    Commands answer it with LIM_ERR / NO_MEMORY; scenario requests raise it."""

    syndrome = Syndrome.NO_MEMORY


class Allocator:
    """Anonymous page-aligned mappings: the only place arenas get memory.

    `map` and `resize` raise MemoryError or OSError when the kernel refuses;
    a failed `resize` leaves the mapping as it was (mremap(2) does)."""

    def map(self, size: int) -> mmap.mmap:
        """Zeroed memory, faulted in at once: the state is written in full
        right away, and page faults one by one cost five times as much."""
        populate = getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)

    def resize(self, mm: mmap.mmap, size: int) -> None:
        """In place by mremap(2): BufferError while someone holds a view."""
        mm.resize(max(size, 1))


SYSTEM = Allocator()


def machine_memory() -> int:
    """Physical memory, or the cgroup's limit if lower (a container's share)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_memory_limit() -> int:
    """Three quarters of the machine's memory: the rest is for the process
    itself, image buffers in flight and the OS."""
    return machine_memory() * 3 // 4


class MemoryBudget:
    """Bytes the firmware holds, against its limit.  `charge` before an
    allocation (it refuses, changing nothing), `credit` when memory is freed
    or an allocation failed."""

    __slots__ = ("allocator", "limit", "used")

    def __init__(self, limit: int | None = None, allocator: Allocator = SYSTEM) -> None:
        if limit is not None and limit <= 0:
            raise ValueError("the memory limit must be positive")
        self.limit = limit if limit is not None else default_memory_limit()
        self.allocator = allocator
        self.used = 0

    @classmethod
    def unlimited(cls) -> MemoryBudget:
        """For state outside any firmware (tests, tools)."""
        return cls(1 << 62)

    def set_limit(self, limit: int) -> None:
        """A new limit (OutOfMemory if the firmware already holds more)."""
        if limit <= 0:
            raise ValueError("the memory limit must be positive")
        if self.used > limit:
            raise OutOfMemory(f"the firmware holds {self.used} bytes, beyond a {limit}-byte limit")
        self.limit = limit

    def charge(self, n: int, what: str) -> None:
        if self.used + n > self.limit:
            raise OutOfMemory(
                f"{what} needs {n} bytes; the firmware holds {self.used} of its "
                f"{self.limit}-byte memory limit"
            )
        self.used += n

    def credit(self, n: int) -> None:
        self.used = max(0, self.used - n)
