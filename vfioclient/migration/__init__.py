"""Migrate VFIO devices the way QEMU's hw/vfio/migration.c does (11.1, with
the VFIO_PRECOPY_INFO_REINIT handling), over VfioClient.

    pairs = [DevicePair(src_client, src_fd, dst_client, dst_fd, name="nic0")]
    report = await migrate(pairs, MigrationOptions(downtime_limit_s=0.3,
                                                   bandwidth_estimate=1 << 30))
    print(report.to_json())

Per device (`DeviceMigration`, device.py): discovery (MIGRATION flags, the
MIG_PRECOPY_INFOv2 opt-in, the DMA logging PROBE, MIG_DATA_SIZE for the
buffer), the source's precopy iterations (one read of up to the buffer size
per iteration, cached initial/dirty counters, ENOMSG = empty for now) and the
destination's RESUMING data fd, fed in stream order by a loader task.  The two
halves talk through an in-process stream (stream.py: a queue of chunks and
markers, standing in for QEMU's migration stream) and a shared `SwitchoverAck`
(switchover.py: the return path's switchover-ack): the source sends
INIT_DATA_SENT when its initial bytes reach 0, the destination approves once
it has written everything before it.

A REINIT (trusted only after a successful v2 opt-in) replaces the cached
initial bytes, resets dirty, clears initial_data_sent and re-arms the ack, so
the switchover waits for the new initial bytes.  After the switchover decision
PRECOPY_INFO is checked once more ("final save_query_pending", run.py): a
REINIT there fails the migration (QEMU 11.1), or with fail_on_late_reinit=False
re-arms the ack and goes back to precopy.

Every state change names a recovery state; if the change fails the recovery
state is tried, and if that fails too the device is reset (QEMU's
vfio_migration_set_state).  A failed migration leaves the sources RUNNING and
resets the destinations (aborting RESUMING).

Multifd (multifd.py), the destination's writes (writer.py), progress
(progress.py) and the report (report.py) each have their module.
"""

from .device import DeviceMigration
from .options import BUFFER_CAP, DevicePair, MigrationOptions
from .progress import Progress, TerminalProgress
from .report import (
    DeviceReport,
    MigrationError,
    MigrationReport,
    ReinitEvent,
    format_bytes,
    report_text,
)
from .run import migrate
from .stream import Chunk
from .switchover import SwitchoverAck

__all__ = [
    "BUFFER_CAP",
    "Chunk",
    "DeviceMigration",
    "DevicePair",
    "DeviceReport",
    "MigrationError",
    "MigrationOptions",
    "MigrationReport",
    "Progress",
    "ReinitEvent",
    "SwitchoverAck",
    "TerminalProgress",
    "format_bytes",
    "migrate",
    "report_text",
]
