"""Host memory shared between a driver and the firmware on one host: files in a
shared memory directory (/dev/shm), mapped by both processes.  The driver
creates and sizes a segment under a name no one can guess, the firmware maps it
by name for an mkey, then the driver unlinks the name; both mappings live on
until each side closes its own.

Whoever maps a segment by name trusts nothing about it (README, "Host
memory"): the name is one path component, a symbolic link is never followed,
and only a regular file with no other name (one link), of an owner the caller
trusts where it knows one, is mapped.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Collection

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
# Opening what may not be a regular file must not block (a FIFO) nor take a tty.
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class HostMemoryError(OSError):
    """A segment cannot be created or mapped."""


class SegmentRefused(HostMemoryError):
    """A segment that may not be mapped: a symbolic link, not a regular file,
    a file with another name (a hard link), or of an owner not trusted."""


def default_shm_dir() -> str:
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def segment_path(shm_dir: str, name: str) -> str:
    """Where segment `name` is: HostMemoryError unless it is a plain file name
    (one path component: no '/', no '..', no NUL)."""
    return _path(shm_dir, name)


def _path(shm_dir: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise HostMemoryError(f"shared memory name {name!r} is not a plain file name")
    return os.path.join(shm_dir, name)


def open_checked(
    name: str, shm_dir: str | None = None, *, owners: Collection[int] | None = None
) -> tuple[int, os.stat_result]:
    """An fd (read-write) on segment `name` and its stat, after the checks:
    never through a symbolic link, a regular file with one link, owned by one
    of `owners` (uids; None: whoever the caller cannot know).  SegmentRefused
    when one fails, HostMemoryError when it cannot be opened at all."""
    shm_dir = shm_dir or default_shm_dir()
    path = _path(shm_dir, name)
    try:
        dir_fd = os.open(shm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise HostMemoryError(e.errno, f"cannot open {shm_dir}: {e.strerror}") from None
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SegmentRefused(e.errno, f"{path} is a symbolic link") from None
        if e.errno in (errno.EISDIR, errno.ENXIO):
            raise SegmentRefused(e.errno, f"{path} is not a regular file") from None
        raise HostMemoryError(e.errno, f"cannot open {path}: {e.strerror}") from None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SegmentRefused(errno.EINVAL, f"{path} is not a regular file")
        if st.st_nlink != 1:
            raise SegmentRefused(
                errno.EINVAL, f"{path} has {st.st_nlink} links: another name reaches it"
            )
        if owners is not None and st.st_uid not in owners:
            raise SegmentRefused(errno.EPERM, f"{path} belongs to uid {st.st_uid}, not a peer's")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class Segment:
    """A mapping of one segment; `view` is the bytes, `ident` the file's
    (st_dev, st_ino) when it was opened by name."""

    def __init__(self, name: str, mm: mmap.mmap, ident: tuple[int, int] | None = None) -> None:
        self.name = name
        self.ident = ident
        self._mm = mm
        self.view = memoryview(mm)

    def close(self) -> None:
        self.view.release()
        # A view someone still holds keeps the mapping alive until it is dropped.
        with contextlib.suppress(BufferError):
            self._mm.close()


def create_segment(
    length: int, shm_dir: str | None = None, prefix: str = "fwemu", *, reserve: bool = False
) -> Segment:
    """A new segment of `length` zero bytes, named `prefix-PID-RANDOM` (no one
    can guess it, so no one can map it first).  `reserve`: allocate its pages
    now, so a full tmpfs fails here (ENOSPC) rather than with SIGBUS on the
    first touch of a page it cannot back, and zero them here too (`populate`):
    tmpfs leaves fallocated pages to be zeroed at their first use, which
    would be the first process to touch or fallocate them after us (for a
    client's segment, the driver's one loop)."""
    if length <= 0:
        raise HostMemoryError("a segment needs a positive length")
    shm_dir = shm_dir or default_shm_dir()
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(16)}"
    path = _path(shm_dir, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise HostMemoryError(e.errno, f"cannot create {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, length)
        if reserve:
            os.posix_fallocate(fd, 0, length)
        mm = mmap.mmap(fd, length)
        if reserve:
            populate(mm)
    except OSError as e:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise HostMemoryError(e.errno, f"cannot size {path}: {e.strerror}") from None
    os.close(fd)
    return Segment(name, mm)


MADV_POPULATE_WRITE = 23  # Linux 5.14 (<asm-generic/mman-common.h>); not in Python 3.11's mmap
PAGE = mmap.PAGESIZE


def populate(mm: mmap.mmap) -> None:
    """Fault in every page of a shared mapping for writing, so that each is
    zeroed now, in this process: madvise(MADV_POPULATE_WRITE), or a byte
    written per page where the kernel lacks it (the bytes stay zero)."""
    try:
        mm.madvise(MADV_POPULATE_WRITE)
    except OSError:
        for off in range(0, len(mm), PAGE):
            mm[off] = 0


def open_segment(
    name: str,
    length: int,
    shm_dir: str | None = None,
    *,
    owners: Collection[int] | None = None,
) -> Segment:
    """Map `length` bytes of segment `name`, checked as open_checked does."""
    fd, st = open_checked(name, shm_dir, owners=owners)
    path = _path(shm_dir or default_shm_dir(), name)
    try:
        if st.st_size < length:
            raise HostMemoryError(f"{path} is smaller than {length} bytes")
        try:
            mm = mmap.mmap(fd, length)
        except OSError as e:
            raise HostMemoryError(e.errno, f"cannot map {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return Segment(name, mm, (st.st_dev, st.st_ino))


def release_pages(view: memoryview) -> bool:
    """Drop this process's mappings of the pages of the mapping `view` is of
    (madvise MADV_DONTNEED, the whole mapping): they leave the resident size,
    and the next touch maps them again.  Of a segment (a shared mapping of a
    file) the bytes stay; of a private mapping they would read as zeros, so
    this is for a buffer whose bytes are spent.  False, and nothing done,
    when `view` is not of a mapping (a bytearray) or the mapping is closed."""
    mm = view.obj
    if not isinstance(mm, mmap.mmap) or mm.closed:
        return False
    mm.madvise(mmap.MADV_DONTNEED)
    return True


def unlink_segment(name: str, shm_dir: str | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(shm_dir or default_shm_dir(), name))
