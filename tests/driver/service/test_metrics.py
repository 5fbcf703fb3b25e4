"""The driver's Prometheus collector: what it sums, and that it stays bounded
and monotonic."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from driver.registry import DeviceRegistry, pci_name
from driver.service.server import DriverServer
from driver.vfio.uapi import MigState
from fwemu.embedded import EmbeddedFirmware
from fwemu.link.ifc import KiB, VfConfig
from fwemu.link.inproc import InProcessLink
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from tests.support import tls_mode
from tests.support.exposition import get, samples
from vfioclient import VfioClient, VfioClientError

pytestmark = pytest.mark.grpc


@pytest.fixture(name="served")
async def served_fixture() -> AsyncIterator[
    tuple[Firmware, DriverServer, CollectorRegistry, VfioClient]
]:
    fw = Firmware(LoopClock(), seed=3)
    fw.create_vfs(3, VfConfig(size=64 * KiB, dirty_bytes_per_s=0))
    reg = CollectorRegistry()
    server = DriverServer(
        DeviceRegistry(InProcessLink(fw)),
        metrics=reg,
        per_device_limit=2,
        firmware=EmbeddedFirmware(fw),
        roles=tls_mode.roles(),
    )
    target = await tls_mode.start(server)
    c = await VfioClient.connect(target)  # TLS from VFIO_TLS_* in the mTLS pass
    try:
        yield fw, server, reg, c
    finally:
        await c.aclose()
        tls_mode.stopped(target)
        await server.stop(0)


async def test_a_stop_copy_read_and_errors_are_counted(served) -> None:
    _, _, reg, c = served
    name = pci_name(1)
    fd = await c.open_device(name)
    await c.set_state(fd, MigState.STOP)
    data_fd = await c.set_state(fd, MigState.STOP_COPY)
    assert data_fd is not None
    m = samples(reg)
    assert get(m, "vfio_open_devices") == 1 and get(m, "vfio_open_data_streams") == 1
    assert get(m, "vfio_saving_queued_bytes") > 0  # saved, not read yet
    n = 0
    while chunk := await c.read(data_fd, 1 << 20):
        n += len(chunk)
    with pytest.raises(VfioClientError):
        await c.precopy_info(data_fd)  # not in PRE_COPY
    m = samples(reg)
    assert get(m, "vfio_migration_read_bytes_total") == n
    assert get(m, "vfio_saving_queued_bytes") == 0
    assert get(m, "vfio_migration_state_transitions_total", from_state="STOP",
               to_state="STOP_COPY") == 1  # fmt: skip
    assert get(m, "vfio_save_images_total", result="ok") >= 1
    assert sum(v for (k, _), v in m.items() if k == "vfio_errors_total") == 1
    assert get(m, "vfio_devices") == 3
    assert get(m, "vfio_audit_findings_total", rule="read-after-eof") == 0  # every rule listed
    # the per-device series: capped at 2 of the 3 devices
    devices = {dict(ls)["device"] for k, ls in m if k == "vfio_device_migration_state"}
    assert devices == {pci_name(1), pci_name(2)}
    assert get(m, "vfio_device_migration_read_bytes_total", device=name) == n
    # the embedded firmware's families are there too
    assert get(m, "fwemu_commands_total", opcode="SAVE_VHCA_STATE", status="OK") >= 1


async def test_counters_stay_when_a_device_goes_away(served) -> None:
    fw, server, reg, c = served
    fd = await c.open_device(pci_name(3))
    await c.set_state(fd, MigState.STOP)
    await c.close(fd)
    before = get(samples(reg), "vfio_migration_state_transitions_total",
                 from_state="RUNNING", to_state="RUNNING_P2P")  # fmt: skip
    assert before == 1
    fw.remove_vf(3)
    await server.registry.refresh()
    m = samples(reg)
    assert get(m, "vfio_devices") == 2
    assert get(m, "vfio_migration_state_transitions_total", from_state="RUNNING",
               to_state="RUNNING_P2P") == before  # fmt: skip


async def test_a_reinit_is_timed_from_the_first_init_report_to_its_answer(served) -> None:
    """vfio_reinit_detection_seconds: one observation per REINIT answer (the
    QUERY that reported INIT, then the answer), none for answers without."""
    fw, _, reg, c = served
    fd = await c.open_device(pci_name(2))
    assert await c.enable_precopy_info_v2(fd)
    data_fd = await c.set_state(fd, MigState.PRE_COPY)
    assert data_fd is not None

    async def drain() -> None:  # to ENOMSG: what is there now was read
        with pytest.raises(VfioClientError) as nothing_now:
            async for _ in c.read_stream(data_fd):
                pass
        assert nothing_now.value.errno == errno.ENOMSG

    await drain()

    def histogram() -> tuple[float, float, float]:
        m = samples(reg)
        return (
            get(m, "vfio_reinit_detection_seconds_count"),
            get(m, "vfio_reinit_detection_seconds_sum"),
            get(m, "vfio_reinit_detection_seconds_bucket", le="+Inf"),
        )

    assert not (await c.precopy_info(data_fd)).reinit
    assert histogram() == (0, 0, 0)
    for _ in range(2):
        fw.reconfigure(2)  # now: new initial data while tracking
        assert (await c.precopy_info(data_fd)).reinit
        await drain()
        assert not (await c.precopy_info(data_fd)).reinit
    count, total, inf = histogram()
    assert count == inf == 2
    assert 0 < total < 5
    await c.close(data_fd)
    await c.close(fd)
