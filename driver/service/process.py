"""A client's descriptor table: what its fds refer to, as a process's.

A client is its x-vfio-client within its principal (grpcsvc.tls.principal):
the same id sent by two principals names two processes, which share
nothing (README, "Principals and owned devices")."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import TypeVar

from ..audit import AuditLog
from ..holders import DeviceHolders
from ..vfio.device import VfioDevice
from ..vfio.errors import VfioError
from ..vfio.ops import MigrationFile
from .usermap import MappedSegments, UserMappings

log = logging.getLogger("vfio-driver")
K = TypeVar("K")

FIRST_FD = 3  # 0-2 are a process's standard streams
RLIMIT_NOFILE = 1024  # the usual soft limit: fd numbers stay below it
# A client with no fd, no Session and no mapping is forgotten after this long
# without a call (longer than a command may take: a call in progress is not cut).
CLIENT_IDLE = 300.0

# A process's key: (principal, x-vfio-client).
ProcessKey = tuple[str, str]


@dataclass(eq=False)
class DeviceFd:
    device: VfioDevice


@dataclass(eq=False)
class DataFd:
    file: MigrationFile
    device: VfioDevice
    stream: int = 0  # the driver's number of the file (events, audit)
    saving: bool = True


class Process:
    """One client's fds.  close() mirrors close(2): the object behind the fd
    is released when its last user goes."""

    def __init__(
        self,
        client: str,
        audit: AuditLog | None = None,
        shm_dir: str | None = None,
        *,
        principal: str = "",
        holders: DeviceHolders | None = None,
        segments: MappedSegments | None = None,
    ) -> None:
        """`holders`: closes device fds (the owner of each device); without
        it a device fd's close is the core's alone.  `segments`: the segments
        mapped by every principal (MapUserMemory refuses another's)."""
        self.client = client
        self.principal = principal
        self.audit = audit  # told of data fds opened and closed
        self.holders = holders
        self.memory = UserMappings(shm_dir, principal=principal, segments=segments)
        self.fds: dict[int, DeviceFd | DataFd] = {}
        self.sessions = 0
        self.ioctl_streams = 0  # Ioctl streams open (its "threads"; MAX_IOCTL_STREAMS)
        self.exited = False
        self.last_used = 0.0  # when a call last named the client (the servicer's clock)

    @property
    def key(self) -> ProcessKey:
        return self.principal, self.client

    @property
    def idle(self) -> bool:
        """Nothing of the client's lives here: forgetting it loses nothing."""
        return not self.fds and not self.sessions and not len(self.memory)

    def install(self, entry: DeviceFd | DataFd) -> int:
        """The lowest free fd (get_unused_fd_flags)."""
        if self.exited:
            # A call still in flight when its client went away: no table to
            # put the fd in (the caller releases what it would have referred to).
            raise VfioError(errno.EBADF, f"client {self.client} has gone away")
        fd = FIRST_FD
        while fd in self.fds:
            fd += 1
        if fd >= RLIMIT_NOFILE:
            raise VfioError(errno.EMFILE, "too many open fds")
        self.fds[fd] = entry
        if self.audit is not None and isinstance(entry, DataFd):
            self.audit.fd_opened(
                entry.device.name,
                entry.stream,
                saving=entry.saving,
                client=self.client,
                fd=fd,
                principal=self.principal,
            )
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
        """close(2): only an fd that is not open fails (EBADF).  What the last
        close runs (close_device, the file's release) cannot fail close(2) --
        the kernel ignores release()'s result -- so its errors are logged."""
        entry = self.get(fd)
        del self.fds[fd]
        if self.audit is not None and isinstance(entry, DataFd):
            self.audit.fd_closed(entry.device.name, entry.stream)
        try:
            if isinstance(entry, DeviceFd):
                if self.holders is not None:
                    await self.holders.close(entry.device, self.principal)
                else:
                    await entry.device.close()
            else:
                await entry.file.release()
        except VfioError as e:
            log.warning("%s: closing fd %d: %s", self.client, fd, e)

    async def exit(self) -> None:
        """What exit does: no new fds, and every fd is closed, data fds first,
        then devices (last close of each).  close() takes an fd out of the
        table before it waits, so two of these running at once (a session
        ending while the server stops) never close one twice."""
        self.exited = True
        while self.fds:
            await self.close(min(self.fds, key=lambda f: (isinstance(self.fds[f], DeviceFd), f)))
        self.memory.close()


def reap_idle(processes: dict[K, Process], now: float, idle_for: float) -> int:
    """Forget the clients idle (Process.idle) for `idle_for` seconds up to
    `now`; the number forgotten.  A forgotten table is exited, so a call still
    running for it cannot put an fd there (EBADF; the call releases it)."""
    gone = [c for c, p in processes.items() if p.idle and now - p.last_used >= idle_for]
    for c in gone:
        processes.pop(c).exited = True
    return len(gone)
