"""Both services scraped around a real migration (fwemu, vfio-driver and the
orchestrating client as separate processes): the counters agree with each
other and with what the client itself counted."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from driver.mlx5.cmd import MIGRATION_HEADER, MLX5_MIGF_HEADER_TAG_FW_DATA
from fwemu.link.ifc import Fault, FaultKind, Opcode
from tests.support.exposition import value
from tests.support.scrape import Served, firmware_and_driver
from tests.support.vfioclient_e2e import Topology, options, rig
from tests.support.vfioclient_usermem import record_user_memory
from vfioclient.migration import MigrationError, migrate

pytestmark = pytest.mark.grpc


@pytest.fixture(name="services", scope="module")
def services_fixture() -> Iterator[tuple[Served, Served]]:
    with firmware_and_driver() as pair:
        yield pair


def records(stream: bytes) -> list[tuple[int, int]]:
    """(tag, payload size) of each record of a saving data fd's stream."""
    out = []
    pos = 0
    while pos < len(stream):
        size, _flags, tag = MIGRATION_HEADER.unpack_from(stream, pos)
        out.append((tag, size))
        pos += MIGRATION_HEADER.size + size
    assert pos == len(stream), "the stream ends inside a record"
    return out


@pytest.mark.parametrize("data_path", ["shm", "grpc"])
async def test_counters_agree_with_each_other_and_with_the_client(
    services: tuple[Served, Served], data_path: str
) -> None:
    """On either data path the bytes counted agree; the gRPC counts are the
    client's calls (ReadInto/WriteFrom on one path, Read/Write on the other)."""
    fw, drv = services
    async with rig(Topology(fw.target, drv.target, drv.target)) as r:
        (p,) = await r.pairs(1)
        read: dict[int, bytearray] = defaultdict(bytearray)  # by data fd
        calls: defaultdict[str, int] = defaultdict(int)
        src_read, src_stream, src_info = r.src.read, r.src.read_stream, r.src.precopy_info

        async def counted_read(fd: int, count: int, **kw: Any) -> bytes:
            calls["Read"] += 1
            data = await src_read(fd, count, **kw)
            read[fd] += data
            return data

        async def counted_stream(fd: int, **kw: Any) -> AsyncIterator[bytes]:
            async for chunk in src_stream(fd, **kw):
                read[fd] += chunk
                yield chunk

        async def counted_info(fd: int, **kw: Any) -> Any:
            calls["PrecopyInfo"] += 1
            return await src_info(fd, **kw)

        def counted_into(fd: int, data: bytes) -> None:
            read[fd] += data

        r.src.read, r.src.read_stream = counted_read, counted_stream  # type: ignore[method-assign]
        r.src.precopy_info = counted_info  # type: ignore[method-assign]
        src_ioctls = r.src.ioctls  # pending_exact's MIG_DATA_SIZE + PRECOPY_INFO

        async def counted_ioctls(*seq: Any) -> list[Any]:
            calls["PrecopyInfo"] += sum(c.rpc == "PrecopyInfo" for c in seq)
            return await src_ioctls(*seq)

        r.src.ioctls = counted_ioctls  # type: ignore[method-assign]
        record_user_memory(r.src, r.dst, counted_into)
        o = r.digest_hook([p])
        o.data_path = data_path
        r.reconfigure_on_first_ack({p.pair.name: p.src_vhca}, o)
        at_decision: list[Any] = []
        decided = o.on_switchover_decision

        async def scrape_at_decision() -> None:
            at_decision.append(await drv.ascrape())
            if decided is not None:
                await decided()

        o.on_switchover_decision = scrape_at_decision
        fw0, drv0 = await fw.ascrape(), await drv.ascrape()
        report = await migrate([p.pair], o)
        fw1, drv1 = await fw.ascrape(), await drv.ascrape()
    (digests,) = r.digests
    assert digests[0] == digests[1]

    def d_fw(name: str, **labels: str) -> float:
        return value(fw1, name, **labels) - value(fw0, name, **labels)

    def d_drv(name: str, **labels: str) -> float:
        return value(drv1, name, **labels) - value(drv0, name, **labels)

    client_read = sum(len(b) for b in read.values())
    recs = [rec for stream in read.values() for rec in records(bytes(stream))]
    image_bytes = sum(size for tag, size in recs if tag == MLX5_MIGF_HEADER_TAG_FW_DATA)
    other_payload = sum(size for tag, size in recs if tag != MLX5_MIGF_HEADER_TAG_FW_DATA)
    headers = MIGRATION_HEADER.size * len(recs)

    # bytes: client == driver read counter == firmware image bytes + records' headers
    assert client_read == report.precopy_bytes + report.stop_copy_bytes > 0
    assert d_drv("vfio_migration_read_bytes_total") == client_read
    assert d_fw("fwemu_image_saved_bytes_total") == image_bytes
    assert client_read == image_bytes + headers + other_payload
    # ... and the destination took all of it: written == read, every image loaded
    assert d_drv("vfio_migration_written_bytes_total") == client_read
    assert d_fw("fwemu_image_loaded_bytes_total") == image_bytes
    # one REINIT where one was triggered
    assert len(report.reinits) == 1
    assert d_drv("vfio_precopy_info_total", reinit="true") == 1
    assert d_fw("fwemu_reconfigurations_total") == 1
    # The driver counts the client's calls, the client metrics the driver's.
    # The library's PRECOPY_INFOs go on Ioctl streams, one message each way
    # (vfioclient/ioctls.py): none is a PrecopyInfo call.
    vfio = {"grpc_service": "vfio.v1.Vfio"}
    precopy = d_drv("vfio_ioctl_seconds_count", ioctl="precopy_info", transport="stream")
    assert precopy == calls["PrecopyInfo"] > 0
    assert d_drv("vfio_ioctl_seconds_count", ioctl="precopy_info", transport="unary") == 0
    assert d_drv("vfio_ioctl_seconds_count", ioctl="set_state", transport="stream") > 0
    ioctl = {"grpc_method": "Ioctl", **vfio}
    answered = d_drv("grpc_server_msg_sent_total", **ioctl)
    assert answered == d_drv("grpc_server_msg_received_total", **ioctl) >= precopy
    assert report.devices[0].data_path == data_path

    def started(method: str) -> float:
        return d_drv("grpc_server_started_total", grpc_method=method, **vfio)

    assert started("PrecopyInfo") == started("DeviceFeature") == started("CloseFd") == 0

    assert started("Read") == calls["Read"]
    if data_path == "shm":  # no migration data crossed gRPC
        assert calls["Read"] == 0 and started("ReadStream") == started("Write") == 0
        assert started("ReadInto") > 0
        # No new call in the downtime (a new call waits behind every other
        # client's to be taken up): the stop-copy's ReadIntoStream was open
        # before the switchover was decided, the destination wrote the
        # precopy (through the REINIT's second INIT_DATA_SENT) and the
        # stop-copy on one WriteFromStream, and the data fds closed on lanes.
        (decision,) = at_decision
        rs = {"grpc_method": "ReadIntoStream", **vfio}
        assert (
            value(decision, "grpc_server_started_total", **rs)
            - value(drv0, "grpc_server_started_total", **rs)
            == started("ReadIntoStream")
            == 1
        )
        assert started("WriteFromStream") == 1
    else:
        assert calls["Read"] > 0 and started("ReadStream") >= 1 and started("Write") >= 1
        assert started("ReadInto") == started("ReadIntoStream") == started("WriteFrom") == 0
    saves = d_fw("fwemu_commands_total", opcode="SAVE_VHCA_STATE", status="OK")
    assert saves > 0
    # The driver's commands travel on the command queue stream: the link counts
    # each command, the gRPC series the stream's messages (no unary command call).
    assert d_drv("vfio_firmware_commands_total", command="SaveVhcaState", code="OK") == saves
    queries = d_fw("fwemu_commands_total", opcode="QUERY_VHCA_MIGRATION_STATE", status="OK")
    assert d_drv("vfio_firmware_commands_total", command="QueryVhcaMigrationState") == queries
    queue = {"grpc_service": "fwemu.api.v1.Firmware", "grpc_method": "CommandQueue"}
    batches = d_fw("grpc_server_msg_received_total", **queue)
    assert 0 < batches <= d_drv("vfio_firmware_commands_total")
    assert d_drv("grpc_client_msg_sent_total", **queue) == batches
    unary = {"grpc_service": "fwemu.api.v1.Firmware", "grpc_method": "SaveVhcaState"}
    assert d_drv("grpc_client_started_total", **unary) == 0
    assert d_fw("grpc_server_started_total", **unary) == 0
    # the state changes of both devices: source and destination arcs
    assert d_drv("vfio_migration_state_transitions_total", from_state="PRE_COPY",
                 to_state="PRE_COPY_P2P") == 1  # fmt: skip
    assert d_drv("vfio_migration_state_transitions_total", from_state="RESUMING",
                 to_state="STOP") == 1  # fmt: skip
    assert value(drv1, "vfio_audit_findings_total") == value(drv0, "vfio_audit_findings_total")


async def test_a_failed_migration_ends_its_unused_stop_copy_stream_ok(
    services: tuple[Served, Served],
) -> None:
    """A migration that fails in its precopy (the destination's LOAD refused)
    never reads its stop-copy: the ReadIntoStream it opened with the precopy
    has ended, status OK (half-closed, as the driver ends one), by the time
    the migration has failed: nothing is left open on the driver."""
    fw, drv = services
    async with rig(Topology(fw.target, drv.target, drv.target)) as r:
        (p,) = await r.pairs(1)
        await r.scenario.inject_fault(
            p.dst_vhca, Fault(FaultKind.FAIL, opcode=Opcode.LOAD_VHCA_STATE, count=1000)
        )
        o = options()
        o.data_path = "shm"
        drv0 = await drv.ascrape()
        with pytest.raises(MigrationError):
            await asyncio.wait_for(migrate([p.pair], o), 30)
        drv1 = await drv.ascrape()

    def handled(code: str) -> float:
        labels = {"grpc_service": "vfio.v1.Vfio", "grpc_method": "ReadIntoStream"}
        labels["grpc_code"] = code
        return value(drv1, "grpc_server_handled_total", **labels) - value(
            drv0, "grpc_server_handled_total", **labels
        )

    assert handled("OK") == 1 and handled("CANCELLED") == 0
