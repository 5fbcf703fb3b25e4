"""A client's descriptor table: what its fds refer to, as a process's."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ..vfio.device import VfioDevice
from ..vfio.errors import VfioError
from ..vfio.ops import MigrationFile

FIRST_FD = 3  # 0-2 are a process's standard streams
MAX_FDS = 1024  # RLIMIT_NOFILE's usual soft limit


@dataclass(eq=False)
class DeviceFd:
    device: VfioDevice


@dataclass(eq=False)
class DataFd:
    file: MigrationFile
    device: VfioDevice


class Process:
    """One client's fds.  close() mirrors close(2): the object behind the fd
    is released when its last user goes."""

    def __init__(self, client: str) -> None:
        self.client = client
        self.fds: dict[int, DeviceFd | DataFd] = {}
        self.sessions = 0

    def install(self, entry: DeviceFd | DataFd) -> int:
        """The lowest free fd (get_unused_fd_flags)."""
        fd = FIRST_FD
        while fd in self.fds:
            fd += 1
        if fd >= FIRST_FD + MAX_FDS:
            raise VfioError(errno.EMFILE, "too many open fds")
        self.fds[fd] = entry
        return fd

    def get(self, fd: int) -> DeviceFd | DataFd:
        try:
            return self.fds[fd]
        except KeyError:
            raise VfioError(errno.EBADF, f"fd {fd} is not open") from None

    def device(self, fd: int) -> VfioDevice:
        entry = self.get(fd)
        if not isinstance(entry, DeviceFd):
            raise VfioError(errno.ENOTTY, f"fd {fd} is a data fd, not a device fd")
        return entry.device

    def data(self, fd: int) -> MigrationFile:
        entry = self.get(fd)
        if not isinstance(entry, DataFd):
            raise VfioError(errno.EINVAL, f"fd {fd} is a device fd, not a data fd")
        return entry.file

    async def close(self, fd: int) -> None:
        entry = self.get(fd)
        del self.fds[fd]
        if isinstance(entry, DeviceFd):
            await entry.device.close()
        else:
            await entry.file.release()

    async def close_all(self) -> None:
        """What exit does: data fds first, then devices (last close of each)."""
        for fd in sorted(self.fds, key=lambda f: isinstance(self.fds[f], DeviceFd)):
            await self.close(fd)
