"""Host memory shared between a driver and the firmware on one host: files in a
shared memory directory (/dev/shm), mapped by both processes.  The driver
creates and sizes a segment, the firmware maps it by name for an mkey, then the
driver unlinks the name; both mappings live on until each side closes its own.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import re
import tempfile

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_serial = itertools.count(1)


class HostMemoryError(OSError):
    """A segment cannot be created or mapped."""


def default_shm_dir() -> str:
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def segment_path(shm_dir: str, name: str) -> str:
    """Where segment `name` is: HostMemoryError unless it is a plain file name."""
    return _path(shm_dir, name)


def _path(shm_dir: str, name: str) -> str:
    if not _NAME.match(name):
        raise HostMemoryError(f"shared memory name {name!r} is not a plain file name")
    return os.path.join(shm_dir, name)


class Segment:
    """A mapping of one segment; `view` is the bytes."""

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        self.name = name
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
    """A new segment of `length` zero bytes.  `reserve`: allocate its pages
    now, so a full tmpfs fails here (ENOSPC) rather than with SIGBUS on the
    first touch of a page it cannot back."""
    if length <= 0:
        raise HostMemoryError("a segment needs a positive length")
    shm_dir = shm_dir or default_shm_dir()
    name = f"{prefix}-{os.getpid()}-{next(_serial)}"
    path = _path(shm_dir, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise HostMemoryError(e.errno, f"cannot create {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, length)
        if reserve:
            os.posix_fallocate(fd, 0, length)
        mm = mmap.mmap(fd, length)
    except OSError as e:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise HostMemoryError(e.errno, f"cannot size {path}: {e.strerror}") from None
    os.close(fd)
    return Segment(name, mm)


def open_segment(name: str, length: int, shm_dir: str | None = None) -> Segment:
    path = _path(shm_dir or default_shm_dir(), name)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise HostMemoryError(e.errno, f"cannot open {path}: {e.strerror}") from None
    try:
        if os.fstat(fd).st_size < length:
            raise HostMemoryError(f"{path} is smaller than {length} bytes")
        mm = mmap.mmap(fd, length)
    except OSError as e:
        if isinstance(e, HostMemoryError):
            raise
        raise HostMemoryError(e.errno, f"cannot map {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return Segment(name, mm)


def unlink_segment(name: str, shm_dir: str | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(shm_dir or default_shm_dir(), name))
