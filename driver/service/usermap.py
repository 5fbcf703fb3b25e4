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

A segment is the client's own file, nothing else (README, "User memory"):
fwemu.hostmem.open_checked opens it, as fwemu opens the driver's, by a name
that is one path component of the shm directory and without following a
symbolic link (O_NOFOLLOW: ELOOP); it must be a regular file with no other
hard link, and, where the caller's uid is known (a unix:PATH listener, whose
file mode admits the socket owner's uid and root), belong to that uid or
root (EACCES otherwise).  Over TCP the caller's uid is unknown, and the
checks of the file stand alone.  A file mapped by one principal cannot be
mapped by another while it is (EACCES), so no principal reaches memory
another principal gave the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os

from fwemu.hostmem import (
    HostMemoryError,
    SegmentRefused,
    default_shm_dir,
    open_checked,
    segment_path,
)

from ..vfio.errors import VfioError

PAGE = 4096
MMAP_BASE = 0x7F00_0000_0000  # where the table's first mapping goes
MAX_MAPPING = 1 << 32  # bytes per mapping (4 GiB)
MAX_MAPPINGS = 64  # per client (a small vm.max_map_count)


# A file: (st_dev, st_ino).
FileId = tuple[int, int]


class MappedSegments:
    """The files mapped by every client of the driver, each by one principal
    at a time: another principal's map of a file is EACCES while it is mapped."""

    def __init__(self) -> None:
        self._by_file: dict[FileId, tuple[str, int]] = {}  # -> (principal, mappings)

    def __len__(self) -> int:
        return len(self._by_file)

    def take(self, file: FileId, principal: str) -> None:
        held = self._by_file.get(file)
        if held is not None and held[0] != principal:
            raise VfioError(errno.EACCES, "the segment is mapped by another principal")
        self._by_file[file] = (principal, (held[1] if held else 0) + 1)

    def give(self, file: FileId) -> None:
        principal, n = self._by_file[file]
        if n > 1:
            self._by_file[file] = (principal, n - 1)
        else:
            del self._by_file[file]


class _Mapping:
    """One mapped segment, unmapped once it is unmapped by the client and no
    read or write is using it."""

    def __init__(self, fd: int, length: int, file: FileId) -> None:
        self.fd, self.length, self.file = fd, length, file
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

    def __init__(
        self,
        shm_dir: str | None = None,
        *,
        principal: str = "",
        segments: MappedSegments | None = None,
    ) -> None:
        """`principal`: the client's; `segments`: the files mapped by every
        client of the driver (default: this table's own)."""
        self.shm_dir = shm_dir
        self.principal = principal
        self.segments = segments if segments is not None else MappedSegments()
        self._maps: dict[int, _Mapping] = {}
        self._next = MMAP_BASE
        self._pending = 0  # maps waiting for their pages
        self._epoch = 0  # one more at each close: a map in flight across it fails
        self._backing = asyncio.Lock()  # one fallocate thread per client at a time

    def __len__(self) -> int:
        return len(self._maps)

    async def map(self, shm_name: str, length: int, *, uids: frozenset[int] | None = None) -> int:
        """Map `length` bytes of the segment: its address.  EINVAL for a bad
        name or length, ENOENT when the segment is not on this host (or not
        in the driver's shm directory), ELOOP for a symbolic link, EACCES
        for a file that is not the client's own (module docstring; `uids`:
        who may own it, None when the caller's uid is unknown), ENOMEM over
        the per-client limit, EBADF when the client went away meanwhile."""
        if not 0 < length <= MAX_MAPPING:
            raise VfioError(errno.EINVAL, f"mapping length {length} is not in (0, {MAX_MAPPING}]")
        if len(self._maps) + self._pending >= MAX_MAPPINGS:
            raise VfioError(errno.ENOMEM, f"a client maps at most {MAX_MAPPINGS} segments")
        try:
            path = segment_path(self.shm_dir or default_shm_dir(), shm_name)
            fd, st = open_checked(shm_name, self.shm_dir, owners=uids)
        except SegmentRefused as e:
            # A symbolic link is open(2)'s own refusal (O_NOFOLLOW); the rest are ours.
            refused = errno.ELOOP if e.errno == errno.ELOOP else errno.EACCES
            raise VfioError(refused, e.strerror or str(e)) from None
        except HostMemoryError as e:
            code = e.errno if e.errno in (errno.ENOENT, errno.EACCES, errno.EPERM) else None
            raise VfioError(code or errno.EINVAL, e.strerror or str(e)) from None
        try:
            if st.st_size < length:
                raise VfioError(errno.EINVAL, f"{path} is smaller than {length} bytes")
            file = (st.st_dev, st.st_ino)
            self.segments.take(file, self.principal)
        except BaseException:
            os.close(fd)
            raise
        epoch = self._epoch
        self._pending += 1
        try:
            await self._back_every_page(fd, file, length, path)
        finally:
            self._pending -= 1
        try:
            if self._epoch != epoch:
                raise VfioError(errno.EBADF, "the client went away during the map")
            try:
                mapping = _Mapping(fd, length, file)
            except OSError as e:
                raise VfioError(errno.ENOMEM, f"cannot map {path}: {e.strerror}") from None
        except BaseException:
            self.segments.give(file)
            os.close(fd)
            raise
        addr = self._next
        self._next += -(-length // PAGE) * PAGE + PAGE  # a guard page between mappings
        self._maps[addr] = mapping
        return addr

    async def _back_every_page(self, fd: int, file: FileId, length: int, path: str) -> None:
        """posix_fallocate the range (module docstring), on a worker thread:
        it zeroes every page the client has not touched yet (a sparse
        segment, or pages it only fallocated), up to MAX_MAPPING bytes, and
        on the driver's one loop that would stall every client meanwhile.
        One thread per client at a time (its maps wait their turn), so that
        one client's many maps cannot hold every worker thread while another
        client's map waits.  On failure the file is given back and `fd`
        closed; cancelled, the thread still has `fd`, so they wait for it."""
        try:
            await self._backing.acquire()
        except BaseException:
            self.segments.give(file)
            os.close(fd)
            raise
        done = asyncio.get_running_loop().run_in_executor(None, os.posix_fallocate, fd, 0, length)

        def release(finished: asyncio.Future[None] | None = None) -> None:
            if finished is not None and not finished.cancelled():
                finished.exception()  # retrieved: after a cancel, a failure is only this
            self._backing.release()
            self.segments.give(file)
            os.close(fd)

        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(release)
            raise
        except OSError as e:
            release()
            raise VfioError(
                errno.ENOMEM, f"no room for the pages of {path}: {e.strerror}"
            ) from None
        self._backing.release()

    def unmap(self, addr: int) -> None:
        """EINVAL unless `addr` is where a mapping starts."""
        mapping = self._maps.pop(addr, None)
        if mapping is None:
            raise VfioError(errno.EINVAL, f"no mapping starts at {addr:#x}")
        self.segments.give(mapping.file)
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
        """The client went away (exit unmaps everything, and a map in flight
        fails with EBADF)."""
        self._epoch += 1
        for m in self._maps.values():
            self.segments.give(m.file)
            m.unmapped = True
            m.release()
        self._maps.clear()
