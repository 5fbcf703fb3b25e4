"""Live migration through the Vfio service, as an orchestrator drives it.

Source: RUNNING -> PRE_COPY after the MIG_PRECOPY_INFOv2 opt-in; precopy
iterations (GET_PRECOPY_INFO, then read; ENOMSG = nothing to read for now)
during which the firmware is reconfigured, so that a later GET_PRECOPY_INFO
reports VFIO_PRECOPY_INFO_REINIT with fresh initial bytes; -> STOP_COPY (the
same fd continues), ReadStream to the end of stream, -> STOP.  Destination
(another VF): -> STOP -> RESUMING, Write the stream, -> STOP, compare the
firmware digests while it is stopped, -> RUNNING.

Run with the driver in this process (over an in-process firmware and over a
`fwemu serve` process), across three processes (`fwemu serve`, `vfio-driver
serve --firmware`, this test) and against `vfio-driver serve` embedding its
firmware (with and without --scenario-service).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from driver.registry import pci_name
from driver.vfio.uapi import VFIO_PRECOPY_INFO_REINIT, Feature, MigState
from fwemu.link.base import ScenarioLink
from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import VfConfig
from grpcsvc.spawn import DRIVER, start, stop
from tests.support import harness_link, tls_mode
from tests.support.driver_service import (
    LOCAL,
    SET,
    DriverUnderTest,
    Vf,
    VfioCallError,
    VfioClient,
    parse_records,
)

S = MigState
pytestmark = pytest.mark.grpc

WORKLOAD = {"size": 1 << 20, "dirty_bytes_per_s": 8 << 20}
MAX_ITERATIONS = 400


@dataclass
class Migration:
    stream: bytes
    iterations: int
    empty_reads: int
    reinits: int
    initial_after_reinit: int  # initial_bytes the REINIT answer reported
    digests: tuple[str, str] | None  # source, destination (None: no firmware access)


async def migrate(client: VfioClient, src: Vf, dst: Vf, firmware: ScenarioLink | None) -> Migration:
    """One migration from src to dst; `firmware` (its scenario side) is
    reconfigured during pre-copy and gives the digests."""
    sfd = await client.open_device(src.name)
    dfd = await client.open_device(dst.name)
    await client.device_feature(sfd, 8, SET | Feature.MIG_PRECOPY_INFOv2)

    # --- source: pre-copy ----------------------------------------------------------
    saving = await client.set_state(sfd, S.PRE_COPY)
    assert saving >= 0
    stream = bytearray()
    empty = reinits = initial_after_reinit = iterations = 0
    reconfigured_at = 3 if firmware is not None else None
    for iterations in range(1, MAX_ITERATIONS + 1):
        if iterations == reconfigured_at:
            assert firmware is not None
            await firmware.reconfigure(src.vhca_id)
        info = await client.precopy_info(saving)
        if info.flags & VFIO_PRECOPY_INFO_REINIT:
            reinits += 1
            initial_after_reinit = info.initial_bytes
        assert info.flags & ~VFIO_PRECOPY_INFO_REINIT == 0  # v2: flags are output only
        try:
            stream += await client.read(saving, 1 << 20)
        except VfioCallError as e:
            assert e.errno == errno.ENOMSG, e
            empty += 1
            await asyncio.sleep(0.005)
        # Ready for STOP_COPY: no initial data left, and (if we reconfigured)
        # the REINIT was seen and its initial data read.
        done_reinit = firmware is None or reinits > 0
        if done_reinit and info.initial_bytes == 0 and empty >= 2 and iterations > 5:
            break
    assert (await client.precopy_info(saving)).initial_bytes == 0

    # --- source: stop-copy -------------------------------------------------------------
    assert await client.set_state(sfd, S.STOP_COPY) == -1  # the saving fd continues
    chunks, err = await client.read_all(saving)
    assert err is None, err  # the permanent end of stream is read() == 0, never ENOMSG
    stream += b"".join(chunks)
    assert await client.set_state(sfd, S.STOP) == -1
    with pytest.raises(VfioCallError) as e:
        await client.read(saving, 1)
    assert e.value.errno == errno.ENODEV  # the session ended with the state it served

    # --- destination ------------------------------------------------------------------------
    await client.set_state(dfd, S.STOP)
    resuming = await client.set_state(dfd, S.RESUMING)
    cut = 256 * 1024 + 3
    written = await client.write(
        resuming, [stream[i : i + cut] for i in range(0, len(stream), cut)]
    )
    assert written == len(stream)
    assert await client.set_state(dfd, S.STOP) == -1  # loads validated: no error
    digests = None
    if firmware is not None:
        digests = (await firmware.digest(src.vhca_id), await firmware.digest(dst.vhca_id))
    assert await client.set_state(dfd, S.RUNNING) == -1
    assert await client.get_state(dfd) == S.RUNNING
    for fd in (saving, resuming, sfd, dfd):
        await client.close(fd)
    return Migration(bytes(stream), iterations, empty, reinits, initial_after_reinit, digests)


def check(m: Migration, *, reconfigured: bool) -> None:
    records = parse_records(m.stream)
    assert records[0] == (8, 1, 1)  # STOP_COPY_SIZE
    images = [r for r in records if r[2] == 0]
    assert len(images) >= 2  # the full image and at least the final one
    if reconfigured:
        assert m.reinits >= 1 and m.initial_after_reinit > 0, m
    else:
        assert m.reinits == 0
    if m.digests is not None:
        src, dst = m.digests
        assert src == dst, "the destination's state differs from the source's"


async def test_migration_through_the_driver_service(drv: DriverUnderTest) -> None:
    """Source to destination through the driver service in this process: the
    stream loads, REINIT is reported after the reconfiguration, digests match."""
    src, dst = await drv.create_vfs(2, **WORKLOAD)
    async with await VfioClient.connect(drv.target) as client:
        m = await migrate(client, src, dst, drv.link)
    check(m, reconfigured=True)


# --- across processes --------------------------------------------------------------------


@pytest.fixture(name="three_processes")
async def three_processes_fixture(
    fwemu_target: str,
) -> AsyncIterator[tuple[str, GrpcLink, Vf, Vf]]:
    """`fwemu serve` (module fixture), `vfio-driver serve --firmware` (here)
    and the test as the client; the fwemu Scenario service drives the firmware."""
    firmware = await harness_link.connect_link(fwemu_target)
    vfs = await firmware.create_vfs(2, VfConfig(**WORKLOAD))
    src, dst = (Vf(pci_name(v.function_id), v.vhca_id) for v in vfs)
    argv = [*DRIVER, *LOCAL, "--firmware", fwemu_target, "--cmd-timeout", "10"]
    proc, target = start([*argv, *tls_mode.server_args(), *tls_mode.firmware_link_args()])
    try:
        yield tls_mode.serving(target), firmware, src, dst
    finally:
        tls_mode.stopped(target)
        rc, err = stop(proc)
        await firmware.close()
    assert rc == 0 and "Traceback" not in err, err


async def test_migration_across_three_processes(
    three_processes: tuple[str, GrpcLink, Vf, Vf],
) -> None:
    """fwemu serve <- vfio-driver serve --firmware <- this client: the same
    migration; the reconfiguration is triggered on the firmware process."""
    target, firmware, src, dst = three_processes
    async with await VfioClient.connect(target) as client:
        names = {d.name for d in await client.list_devices()}
        assert {src.name, dst.name} <= names
        m = await migrate(client, src, dst, firmware)
        check(m, reconfigured=True)
        # Everything was closed: both devices are free again.
        assert (await client.device_info(src.name)).open_count == 0


@pytest.fixture(name="embedded")
def embedded_fixture(request: pytest.FixtureRequest) -> Iterator[str]:
    """`vfio-driver serve` with its firmware embedded (two VFs)."""
    extra = ["--scenario-service"] if request.param else []
    vfs = ["--vfs", "2", "--size", "1MiB", "--dirty-rate", "8MiB"]
    proc, target = start([*DRIVER, *LOCAL, *vfs, "--cmd-timeout", "10", *extra])
    yield target
    rc, err = stop(proc)
    assert rc == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("embedded", [False], indirect=True)
async def test_migration_with_the_embedded_firmware(embedded: str) -> None:
    """Without a firmware process nothing outside can reconfigure the VF or
    read digests: the migration completes, the destination validates every
    image it loads (RESUMING -> STOP succeeds) and runs again."""
    async with await VfioClient.connect(embedded) as client:
        a, b = await client.list_devices()
        assert (a.migratable, b.migratable) == (True, True)
        m = await migrate(client, Vf(a.name, a.vhca_id), Vf(b.name, b.vhca_id), None)
    check(m, reconfigured=False)


@pytest.mark.parametrize("embedded", [True], indirect=True)
async def test_migration_with_the_embedded_firmware_and_its_scenario_service(
    embedded: str,
) -> None:
    """--scenario-service serves the embedded firmware's fwemu Scenario
    service on the driver's port: reconfigurations and digests as with a
    firmware process (GrpcLink's scenario side needs no completion stream)."""
    firmware = GrpcLink(embedded)
    try:
        async with await VfioClient.connect(embedded) as client:
            a, b = await client.list_devices()
            m = await migrate(client, Vf(a.name, a.vhca_id), Vf(b.name, b.vhca_id), firmware)
        check(m, reconfigured=True)
    finally:
        await firmware.close()
