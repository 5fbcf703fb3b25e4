"""What a migration is asked to do: the devices (`DevicePair`) and the knobs
and hooks (`MigrationOptions`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..client import VfioClient

if TYPE_CHECKING:
    from .device import DeviceMigration
    from .progress import Progress

BUFFER_CAP = 1 << 20  # QEMU's VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE

Hook = Callable[[], Awaitable[None]]
IterationHook = Callable[[int], Awaitable[None]]
DeviceHook = Callable[["DeviceMigration"], Awaitable[None]]
DigestHook = Callable[["DeviceMigration"], Awaitable[tuple[str, str]]]


@dataclass
class MigrationOptions:
    downtime_limit_s: float = 0.3
    bandwidth_estimate: int = 1 << 30  # bytes/s
    max_precopy_iterations: int = 10_000
    iteration_interval_s: float = 0.005  # pause after an iteration that read nothing
    stream_depth: int = 16  # chunks in flight between source reads and destination writes
    fail_on_late_reinit: bool = True  # QEMU 11.1
    buffer_cap: int = BUFFER_CAP
    # Hooks (tests, tracing): awaited at the named points.
    on_iteration: IterationHook | None = None  # before each precopy iteration
    # The destination, just before it approves (across hosts: the source, as
    # the approval arrives, before it counts).
    on_switchover_ack: DeviceHook | None = None
    on_switchover_decision: Hook | None = None  # after the decision, before the final check
    on_destinations_loaded: Hook | None = None  # every destination in STOP, before it runs
    # Verification: (source digest, destination digest) of a device, asked for
    # while both are stopped (destinations loaded); unequal fails the migration.
    # Across hosts the destination digest comes on the return path:
    # DeviceMigration.destination_digest.
    digests: DigestHook | None = None
    # Multifd stop-copy (0 = off: the stop-copy data goes on the main stream).
    multifd_channels: int = 0
    multifd_max_queued_bytes: int = 32 << 20  # sent, not yet written (>= one packet)
    multifd_jitter_s: float = 0.002  # each channel delays each packet by up to this
    progress: Progress | None = None  # None: no progress
    # How the data moves between the drivers and us: "auto" (user memory when
    # the driver is on this host, else gRPC), "shm" (user memory or fail),
    # "grpc" (Read/ReadStream/Write messages).  See vfioclient/usermem.py.
    data_path: str = "auto"

    @property
    def threshold(self) -> float:
        return self.bandwidth_estimate * self.downtime_limit_s


@dataclass
class DevicePair:
    """One device's source fd and destination fd (device fds, opened by the
    caller, who keeps them), possibly on two clients / services."""

    source: VfioClient
    source_fd: int
    destination: VfioClient
    destination_fd: int
    name: str = ""


@dataclass
class OutgoingDevice:
    """One device to migrate to a destination agent (`migrate_to`): the
    source's fd on its client (opened by the caller, who keeps it), and the
    destination device's name on the agent's driver."""

    source: VfioClient
    source_fd: int
    destination: str
    name: str = ""
