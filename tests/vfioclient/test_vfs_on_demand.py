"""VFs created and removed on demand (issue 13): against a running `fwemu
serve` and an already running `vfio-driver serve --firmware` (real processes,
in the run's mode), a VF the Scenario service creates is listed and opened by
the driver without a restart, and a VF it removes is gone: ENOENT on open,
whether or not anyone listed the devices in between.  ScenarioClient is the
orchestrator (the admin in the mTLS pass); the driver's client is the tests'
raw one."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator

import pytest

from driver.shards import pci_name
from fwemu.link.ifc import KiB, VfConfig
from grpcsvc.spawn import DRIVER, FWEMU
from tests.support import tls_mode
from tests.support.driver_service import VfioClient, errno_of
from tests.support.tls_mode import served
from vfioclient.scenario import ScenarioClient

pytestmark = pytest.mark.grpc

QUIET = ("--log-level", "error", "--loop", "asyncio")
VF = VfConfig(size=64 * KiB, dirty_bytes_per_s=0)


@contextlib.asynccontextmanager
async def running() -> AsyncIterator[tuple[ScenarioClient, VfioClient]]:
    """`fwemu serve` without VFs and a `vfio-driver serve --firmware` on it,
    both started before any VF exists: the orchestrator's Scenario client and
    a client of the driver."""
    link = tls_mode.firmware_link_args()
    with (
        served(FWEMU, "--vfs", "0", *QUIET) as (_, fw),
        served(DRIVER, "--firmware", fw, *QUIET, *link) as (_, target),
    ):
        async with (
            await ScenarioClient.connect(fw) as scenario,
            await VfioClient.connect(target) as client,
        ):
            yield scenario, client


async def test_vfs_made_and_removed_through_scenario_come_and_go_in_a_running_driver() -> None:
    """Created: listed and opened (by name at once, nobody having listed the
    devices, too).  Removed: gone from ListDevices, then ENOENT on open.
    Created again in the slot: a new device (another uid), listed and opened."""
    async with running() as (scenario, client):
        assert await client.list_devices() == []
        [one] = await scenario.create_vfs(1, VF)
        assert [d.name for d in await client.list_devices()] == [pci_name(one.function_id)]
        await client.close(await client.open_device(pci_name(one.function_id)))
        [two] = await scenario.create_vfs(1, VF)
        await client.close(await client.open_device(pci_name(two.function_id)))

        await scenario.remove_vf(two.vhca_id)
        assert [d.name for d in await client.list_devices()] == [pci_name(one.function_id)]
        assert await errno_of(client.open_device(pci_name(two.function_id))) == errno.ENOENT

        await scenario.remove_vf(one.vhca_id)
        [again] = await scenario.create_vfs(1, VF)
        assert again.vhca_id == one.vhca_id and again.uid != one.uid
        assert [d.name for d in await client.list_devices()] == [pci_name(one.function_id)]
        fd = await client.open_device(pci_name(again.function_id))
        assert (await client.device_info(pci_name(again.function_id))).open_count == 1
        await client.close(fd)


async def test_open_sees_removals_and_replacements_before_anyone_lists_the_devices() -> None:
    async with running() as (scenario, client):
        [vf] = await scenario.create_vfs(1, VF)
        await client.close(await client.open_device(pci_name(vf.function_id)))
        await scenario.remove_vf(vf.vhca_id)
        assert await errno_of(client.open_device(pci_name(vf.function_id))) == errno.ENOENT
        await scenario.create_vfs(1, VF)  # a new device in the slot
        fd = await client.open_device(pci_name(vf.function_id))
        assert (await client.device_info(pci_name(vf.function_id))).open_count == 1
        await client.close(fd)
