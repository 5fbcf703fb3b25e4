"""What a migration may leave behind after it ended, and what it must not:
data fds / streams in a driver's process tables, user-memory mappings,
firmware mkeys beyond a baseline, and this process's shared memory segments."""

from __future__ import annotations

import os

from driver.service.process import DataFd
from driver.service.servicer import VfioServicer

SHM_DIR = "/dev/shm"


def shm_segments(pid: int | None = None) -> set[str]:
    """The segments of the client library of process `pid` (default: this one)."""
    prefix = f"vfioclient-{pid if pid is not None else os.getpid()}-"
    return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}


def open_data_fds(servicer: VfioServicer) -> list[tuple[str, int]]:
    """(client, fd) of every data fd open in the driver."""
    return [
        (p.client, fd)
        for p in servicer.processes.values()
        for fd, e in p.fds.items()
        if isinstance(e, DataFd)
    ]


def user_mappings(servicer: VfioServicer) -> int:
    return sum(len(p.memory) for p in servicer.processes.values())


def open_fds(servicer: VfioServicer) -> int:
    return sum(len(p.fds) for p in servicer.processes.values())
