"""The calls on fds that the servicer's RPCs share: read(2) and write(2)
through the caller's mapped memory, the direction check of a data fd, a
file's stream, the user memory of a feature ioctl."""

from __future__ import annotations

import errno
from collections.abc import Iterable

from ..api.v1 import vfio_pb2 as pb
from ..mlx5.migf import Mlx5VfMigrationFile
from ..mlx5.save import SaveFile
from ..vfio.errors import VfioError
from ..vfio.ops import MigrationFile
from ..vfio.usermem import UserMemory
from .process import DataFd, Process

MAX_READ = 16 << 20  # one message; read(2) may return less than asked anyway
MAX_WRITE = MAX_READ  # one WriteFrom; write(2) may take less (the count says)


async def read_into(proc: Process, req: pb.ReadIntoRequest) -> int:
    """read(2) into the caller's mapped memory."""
    file = data_fd_file(proc, req.fd, saving=True)
    with proc.memory.range(req.addr, min(req.count, MAX_READ)) as dest:
        return await file.readinto(dest, nonblock=req.nonblock)


async def write_from(proc: Process, req: pb.WriteFromRequest) -> int:
    """write(2) from the caller's mapped memory."""
    file = data_fd_file(proc, req.fd, saving=False)
    with proc.memory.range(req.addr, min(req.count, MAX_WRITE)) as src:
        return await file.write(src.view)


def data_fd_file(proc: Process, fd: int, *, saving: bool) -> MigrationFile:
    """The data fd's file for read(2) (`saving`) or write(2): vfs_read/vfs_write
    refuse the wrong direction (EBADF) before the user range is looked at."""
    file = proc.data(fd)
    entry = proc.get(fd)
    if isinstance(entry, DataFd) and entry.saving != saving:
        which = "write-only (resuming)" if saving else "read-only (saving)"
        raise VfioError(errno.EBADF, f"fd {fd} is {which}")
    return file


def stream_of(file: MigrationFile) -> tuple[int, bool]:
    """An mlx5vf file's stream number and side (saving?)."""
    if isinstance(file, Mlx5VfMigrationFile):
        return file.stream_id, isinstance(file, SaveFile)
    return 0, True


def user_memory(buffers: Iterable[pb.UserBuffer]) -> UserMemory:
    """The caller's address space; buffers that overlap (or share an address)
    describe none, so their addresses are bad: EFAULT."""
    mem: dict[int, bytearray] = {}
    for b in buffers:
        if b.addr in mem:
            raise VfioError(errno.EFAULT, f"two user buffers at {b.addr:#x}")
        mem[b.addr] = bytearray(b.data)
    try:
        return UserMemory(mem)
    except ValueError as e:
        raise VfioError(errno.EFAULT, f"user memory: {e}") from None
