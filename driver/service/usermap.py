"""A client's mapped user memory: the shared memory segments it gave the
driver (MapUserMemory), at addresses of the client's address space, for
read(2)/write(2) through memory (ReadInto/WriteFrom) instead of gRPC messages.

The addresses are this table's own (a process's mmap area), so a read or a
write names its buffer as `(addr, count)` just as the syscalls do; a range
that does not lie inside one mapping is EFAULT, as an unmapped user pointer
is for copy_to_user.

The driver maps each segment.  A page of a mapping that the file cannot
back kills the process with SIGBUS, so MapUserMemory allocates every page of
the range first (posix_fallocate: a sparse segment on a full tmpfs is ENOMEM
at map time, not a crash at the first copy), and each copy checks the file
still covers its range (a client that shrank its segment gets EFAULT).  What
remains is a client shrinking its file during a copy: as any process of the
driver's user can kill it, the driver does not defend against that.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os

from fwemu.hostmem import HostMemoryError, default_shm_dir, segment_path

from ..vfio.errors import VfioError

PAGE = 4096
MMAP_BASE = 0x7F00_0000_0000  # where the table's first mapping goes
MAX_MAPPING = 1 << 32  # bytes per mapping (4 GiB)
MAX_MAPPINGS = 64  # per client (a small vm.max_map_count)


class _Mapping:
    """One mapped segment, unmapped once it is unmapped by the client and no
    read or write is using it."""

    def __init__(self, fd: int, length: int) -> None:
        self.fd, self.length = fd, length
        self.mm: mmap.mmap | None = mmap.mmap(fd, length)
        self.view = memoryview(self.mm)
        self.users = 0
        self.unmapped = False

    def covered(self, end: int) -> bool:
        """The file still holds bytes up to `end` (the client may shrink it)."""
        try:
            return os.fstat(self.fd).st_size >= end
        except OSError:
            return False

    def release(self) -> None:
        if self.unmapped and self.users == 0 and self.mm is not None:
            self.view.release()
            with contextlib.suppress(BufferError):  # a view still held: it goes with it
                self.mm.close()
            self.mm = None
            os.close(self.fd)


class UserRange:
    """[addr, addr + count) of one mapping: what copy_to_user and
    copy_from_user reach, for the length of a `with` block.  Slice assignment
    writes the client's memory (the `dest` of MigrationFile.readinto); `view`
    is its bytes."""

    def __init__(self, mapping: _Mapping, offset: int, count: int) -> None:
        self._map, self._offset, self._count = mapping, offset, count
        self._held = True
        mapping.users += 1

    def __enter__(self) -> UserRange:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._held = False
            self._map.users -= 1
            self._map.release()

    def __len__(self) -> int:
        return self._count

    def _check(self) -> None:
        if not self._map.covered(self._offset + self._count):
            raise VfioError(errno.EFAULT, "user memory ends inside the range (segment shrunk)")

    def __setitem__(self, key: slice, data: memoryview) -> None:
        start, stop, step = key.indices(self._count)
        if step != 1 or stop - start != len(data):
            raise ValueError("a contiguous slice of the data's length")
        self._check()
        pos = self._offset + start
        self._map.view[pos : pos + len(data)] = data

    @property
    def view(self) -> memoryview:
        """The client's bytes (EFAULT if its segment no longer covers them)."""
        self._check()
        return self._map.view[self._offset : self._offset + self._count]


class UserMappings:
    """`addr -> (fd, length)` for one client; addresses are never reused
    while the table lives, so a stale address cannot land in a newer mapping."""

    def __init__(self, shm_dir: str | None = None) -> None:
        self.shm_dir = shm_dir
        self._maps: dict[int, _Mapping] = {}
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
            path = segment_path(self.shm_dir or default_shm_dir(), shm_name)
        except HostMemoryError as e:
            raise VfioError(errno.EINVAL, str(e)) from None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            code = e.errno if e.errno in (errno.ENOENT, errno.EACCES, errno.EPERM) else None
            raise VfioError(code or errno.EINVAL, f"cannot open {path}: {e.strerror}") from None
        try:
            if os.fstat(fd).st_size < length:
                raise VfioError(errno.EINVAL, f"{path} is smaller than {length} bytes")
            try:
                os.posix_fallocate(fd, 0, length)  # every page backed before any copy
            except OSError as e:
                raise VfioError(
                    errno.ENOMEM, f"no room for the pages of {path}: {e.strerror}"
                ) from None
            try:
                mapping = _Mapping(fd, length)
            except OSError as e:
                raise VfioError(errno.ENOMEM, f"cannot map {path}: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        addr = self._next
        self._next += -(-length // PAGE) * PAGE + PAGE  # a guard page between mappings
        self._maps[addr] = mapping
        return addr

    def unmap(self, addr: int) -> None:
        """EINVAL unless `addr` is where a mapping starts."""
        mapping = self._maps.pop(addr, None)
        if mapping is None:
            raise VfioError(errno.EINVAL, f"no mapping starts at {addr:#x}")
        mapping.unmapped = True
        mapping.release()

    def range(self, addr: int, count: int) -> UserRange:
        """The caller's bytes [addr, addr + count), to use in a `with` block:
        EFAULT unless they lie in one mapping."""
        for base, m in self._maps.items():
            if base <= addr and addr + count <= base + m.length:
                return UserRange(m, addr - base, count)
        raise VfioError(errno.EFAULT, f"user range [{addr:#x}, +{count}) is not mapped")

    def close(self) -> None:
        """The client went away (exit unmaps everything)."""
        for m in self._maps.values():
            m.unmapped = True
            m.release()
        self._maps.clear()
