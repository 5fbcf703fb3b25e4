"""What joins a device's source half to its destination half: the
migration stream one way, the return path (the switchover-ack, a load
failure, "loaded" with the destination digests, "running") the other.  Two
implementations: in this process (local.py: a queue and the shared
SwitchoverAck, both halves here) and across hosts (remote.py: a socket to a
destination agent, incoming.py).

`DestinationLink` is one device's; `Destinations` the whole migration's,
whose steps (setup, complete, start, abort) run.py calls at the same points
whichever the implementation."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..client import VfioClient
from .stream import StreamItem

if TYPE_CHECKING:
    from .device import DeviceMigration


class DestinationLink(abc.ABC):
    """One device's destination as its source half sees it."""

    data_path = ""  # how the destination side moves its data ("shm" | "grpc")
    per_side = False  # the report names each side's data path even when alike (two hosts)
    digest = ""  # the destination's digest, once complete (when it verifies)

    @property
    def memory_clients(self) -> Sequence[VfioClient]:
        """Drivers besides the source's that should map the source's user memory."""
        return ()

    def memory_mapped(self, mapped: bool) -> None:  # noqa: B027 (most links have none)
        """Whether they did (the source's user memory setup)."""

    async def start(self) -> None:  # noqa: B027 (across hosts the agent did it)
        """The device's load_setup, where it is this side's to do."""

    @abc.abstractmethod
    async def send(self, item: StreamItem) -> None:
        """The next item of the device's migration stream, in order; waits
        while the destination is behind; MigrationError if it failed."""

    @abc.abstractmethod
    def check(self) -> None:
        """MigrationError if the destination failed."""

    @property
    @abc.abstractmethod
    def failed(self) -> asyncio.Future[None]:
        """Done once the destination failed (or ended): stop waiting on it."""

    @abc.abstractmethod
    async def written(self) -> None:
        """Everything sent is written on the destination (or on its way:
        `Destinations.complete` waits for the rest)."""


class Destinations(abc.ABC):
    """The destination side of a whole migration."""

    channel = ""  # how the stream travels: "" in this process, else the agent's address
    # True: setup makes the links and maps none of the sources' memory (an
    # agent's load_setup), so it runs while the sources' save_setup does.
    setup_alongside = False
    # Time complete() spent on the destinations' digests (across hosts, the
    # agent's): verification, kept out of the downtime as the digests hook is.
    verify_s = 0.0
    # False: nothing looks at a stopped destination (no digests, no
    # on_destinations_loaded hook), so complete() leaves it RESUMING and
    # start() sets RUNNING_P2P / RUNNING from there, as QEMU's vm start does
    # (the kernel walks RESUMING -> STOP -> RUNNING_P2P: the same load and
    # validation, one ioctl fewer in the downtime).  In this process only: an
    # agent reports its destinations loaded, so it stops them.
    stop_before_start = True

    @abc.abstractmethod
    async def setup(self, devices: Sequence[DeviceMigration]) -> None:
        """After discovery, before the sources' setup: every device's link,
        and (across hosts) every destination RESUMING."""

    @abc.abstractmethod
    async def complete(self, devices: Sequence[DeviceMigration]) -> None:
        """Every device's stream ended: every destination loaded (RESUMING ->
        STOP, the driver validates; see stop_before_start), its digest on its
        link when it verifies."""

    @abc.abstractmethod
    async def start(self, devices: Sequence[DeviceMigration]) -> None:
        """Every destination RUNNING_P2P (those with P2P), then RUNNING."""

    @abc.abstractmethod
    async def abort(self, devices: Sequence[DeviceMigration], error: BaseException) -> None:
        """The migration failed: every destination reset."""

    async def close(self) -> None:  # noqa: B027 (in this process nothing is open)
        """After success or failure: nothing left open."""
