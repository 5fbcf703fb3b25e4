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
the switchover waits for the new initial bytes.  One in the first
PRECOPY_INFO, right after PRE_COPY, is taken the same way (the first ack
waits for its initial bytes); the report lists every one with its phase.
After the switchover decision PRECOPY_INFO is checked once more ("final
save_query_pending", run.py): a REINIT there fails the migration (QEMU
11.1), or with fail_on_late_reinit=False re-arms the ack and goes back to
precopy.

Every state change names a recovery state; if the change fails the recovery
state is tried, and if that fails too the device is reset (QEMU's
vfio_migration_set_state).  A failed migration leaves the sources RUNNING and
resets the destinations (aborting RESUMING).

The source half is `DeviceMigration` (device.py), the destination half
`DestinationDevice` (destination.py); what joins them (link.py) is either in
this process (local.py: a queue per device and the shared ack, the user
memory one segment both drivers map) or a socket (remote.py).  run.py's
logic (precopy rounds, the switchover decision, the final PRECOPY_INFO
check, the REINIT re-arm, stop-copy, recovery) is the same for both.

Across hosts, as QEMU and libvirt run it, two agents, each beside its
driver and moving data to and from it through its own user memory:

    # destination host: the destination agent (`vfioctl migrate --incoming`)
    reports = await serve_incoming(dst_client, "tcp:0.0.0.0:7000", only="0000:81:00.2",
                                   once=True, tls=listener_tls(client_tls()), digest=fw_digest)
    # source host: the source agent (`vfioctl migrate SRC DST --to URI`)
    report = await migrate_to([OutgoingDevice(src_client, src_fd, "0000:81:00.2")],
                              "tcp:dst-host:7000", options, tls=client_tls())

One connection carries the migration stream one way and the return path the
other (wire.py: QEMU's be64 tags, a per-device section, COMPLETE/RUN/ABORT;
READY, SWITCHOVER_ACK with the ack generation, LOADED with the destination
digests, RUNNING, ERROR with an errno); connection.py has the addresses,
TLS and a socket reader that receives payloads straight into user memory.
The destination agent's side reports on its own (`IncomingReport`).

Multifd (multifd.py, in this process only), the destination's writes
(writer.py), progress (progress.py), the report (report.py) and hooks that
act at a chosen moment (hooks.py: `at_first_ack`, the demo's
reconfiguration) each have their module.
"""

from .connection import Address, ListenerTls, dialer_tls, listener_tls
from .destination import DestinationDevice
from .device import DeviceMigration
from .hooks import FirstAck, at_first_ack
from .incoming import (
    IncomingAgent,
    IncomingOptions,
    IncomingReport,
    incoming_text,
    serve_incoming,
)
from .options import BUFFER_CAP, DevicePair, MigrationOptions, OutgoingDevice
from .progress import Progress, TerminalProgress
from .remote import migrate_to
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
    "Address",
    "Chunk",
    "DestinationDevice",
    "DeviceMigration",
    "DevicePair",
    "DeviceReport",
    "FirstAck",
    "IncomingAgent",
    "IncomingOptions",
    "IncomingReport",
    "ListenerTls",
    "MigrationError",
    "MigrationOptions",
    "MigrationReport",
    "OutgoingDevice",
    "Progress",
    "ReinitEvent",
    "SwitchoverAck",
    "TerminalProgress",
    "at_first_ack",
    "dialer_tls",
    "format_bytes",
    "incoming_text",
    "listener_tls",
    "migrate",
    "migrate_to",
    "report_text",
    "serve_incoming",
]
