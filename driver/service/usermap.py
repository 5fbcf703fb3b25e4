"""A client's mapped user memory: the shared memory segments it gave the
driver (MapUserMemory), at addresses of the client's address space, for
read(2)/write(2) through memory (ReadInto/WriteFrom) instead of gRPC messages.

The addresses are this table's own (a process's mmap area), so a read or a
write names its buffer as `(addr, count)` just as the syscalls do; a range
that does not lie inside one mapping is EFAULT, as an unmapped user pointer
is for copy_to_user.
"""

from __future__ import annotations

import errno

from fwemu.hostmem import HostMemoryError, Segment, open_segment

from ..vfio.errors import VfioError

PAGE = 4096
MMAP_BASE = 0x7F00_0000_0000  # where the table's first mapping goes
MAX_MAPPING = 1 << 32  # bytes per mapping (4 GiB)
MAX_MAPPINGS = 64  # per client (a small vm.max_map_count)


class UserMappings:
    """`addr -> Segment` for one client; addresses are never reused while the
    table lives, so a stale address cannot land in a newer mapping."""

    def __init__(self, shm_dir: str | None = None) -> None:
        self.shm_dir = shm_dir
        self._maps: dict[int, Segment] = {}
        self._next = MMAP_BASE

    def __len__(self) -> int:
        return len(self._maps)

    def map(self, shm_name: str, length: int) -> int:
        """Map `length` bytes of the segment: its address.  EINVAL for a bad
        name or length, ENOENT when the segment is not on this host (or not
        in the driver's shm directory), ENOMEM over the per-client limit."""
        if not 0 < length <= MAX_MAPPING:
            raise VfioError(errno.EINVAL, f"mapping length {length} is not in (0, {MAX_MAPPING}]")
        if len(self._maps) >= MAX_MAPPINGS:
            raise VfioError(errno.ENOMEM, f"a client maps at most {MAX_MAPPINGS} segments")
        try:
            seg = open_segment(shm_name, length, self.shm_dir)
        except HostMemoryError as e:
            code = e.errno if e.errno in (errno.ENOENT, errno.EACCES, errno.EPERM) else None
            raise VfioError(code or errno.EINVAL, e.strerror or str(e)) from None
        addr = self._next
        self._next += -(-length // PAGE) * PAGE + PAGE  # a guard page between mappings
        self._maps[addr] = seg
        return addr

    def unmap(self, addr: int) -> None:
        """EINVAL unless `addr` is where a mapping starts."""
        seg = self._maps.pop(addr, None)
        if seg is None:
            raise VfioError(errno.EINVAL, f"no mapping starts at {addr:#x}")
        seg.close()

    def range(self, addr: int, count: int) -> memoryview:
        """The caller's bytes [addr, addr + count): EFAULT unless they lie in one mapping."""
        for base, seg in self._maps.items():
            if base <= addr and addr + count <= base + len(seg.view):
                off = addr - base
                return seg.view[off : off + count]
        raise VfioError(errno.EFAULT, f"user range [{addr:#x}, +{count}) is not mapped")

    def close(self) -> None:
        """The client went away (exit unmaps everything)."""
        for seg in self._maps.values():
            seg.close()
        self._maps.clear()
