"""The holders of each VF reach a separate firmware (issue 12, items 3-4):
a driver over a `fwemu` FirmwareServer, both with mutual TLS (the driver's
link with its own certificate, --firmware-tls-*), tells the firmware who
holds a device on the first open and the last close.  A firmware that goes
away fails no open or close; once it is back (a restart: it knows nobody)
the driver tells it the holders of every device again."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from driver.holders import HOLDERS_WAIT
from driver.registry import DeviceRegistry, pci_name
from driver.service.server import DriverServer
from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import VfConfig
from fwemu.link.inproc import InProcessLink
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from fwemu.service.server import FirmwareServer
from tests.driver.service.tenancy import A, B, TenantClient
from tests.support.driver_service import CMD_TIMEOUT, SMALL_VF, Vf, eventually
from tests.support.tls import DRIVER, Pki

pytestmark = pytest.mark.grpc


@dataclass
class Remote:
    """A firmware server and a driver over it, both with mutual TLS."""

    pki: Pki
    fw: Firmware
    fw_server: FirmwareServer
    fw_address: str
    link: GrpcLink
    driver: DriverServer
    target: str
    vfs: list[Vf]

    async def restart_firmware(self) -> None:
        """A new firmware process on the same address: the same VFs, no holders."""
        await self.fw_server.stop(0)
        self.fw, self.fw_server = await _firmware(self.pki, self.fw_address, len(self.vfs))

    async def client(self, name: str) -> TenantClient:
        return await TenantClient.of(self.target, self.pki.client_tls(name))


async def _firmware(pki: Pki, listen: str, vfs: int) -> tuple[Firmware, FirmwareServer]:
    fw = Firmware(LoopClock(), seed=5)
    await InProcessLink(fw).create_vfs(vfs, VfConfig(**SMALL_VF))
    server = FirmwareServer(fw, roles=pki.roles())
    await server.start(listen, tls_config=pki.server_tls())
    return fw, server


@pytest.fixture(name="remote")
async def remote_fixture(pki: Pki) -> AsyncIterator[Remote]:
    fw, fw_server = await _firmware(pki, "127.0.0.1:0", 2)
    fw_address = f"127.0.0.1:{fw_server.service.port}"
    link = await GrpcLink.connect(fw_address, tls=pki.client_tls(DRIVER))
    driver = DriverServer(DeviceRegistry(link, cmd_timeout=CMD_TIMEOUT), roles=pki.roles())
    port = await driver.start("127.0.0.1:0", tls_config=pki.server_tls())
    vfs = [Vf(pci_name(v.function_id), v.vhca_id) for v in await link.list_vfs()]
    r = Remote(pki, fw, fw_server, fw_address, link, driver, f"127.0.0.1:{port}", vfs)
    yield r
    await driver.stop(0)
    await link.close()
    await r.fw_server.stop(0)


async def test_holders_reach_the_firmware_and_again_after_its_restart(remote: Remote) -> None:
    r = remote
    va, vb = r.vfs
    a, b = await r.client(A), await r.client(B)
    fd_a = await a.open_device(va.name)
    fd_b = await b.open_device(vb.name)
    mine, theirs = r.pki.principal(A), r.pki.principal(B)
    assert r.fw.holders == {va.vhca_id: {mine}, vb.vhca_id: {theirs}}
    await b.close(fd_b)
    assert r.fw.holders == {va.vhca_id: {mine}}

    await r.restart_firmware()
    assert r.fw.holders == {}

    async def told_again() -> bool:
        return r.link.up and r.fw.holders == {va.vhca_id: {mine}}

    assert await eventually(told_again, timeout=10)
    await a.close(fd_a)
    assert r.fw.holders == {}
    await a.close_channel()
    await b.close_channel()


async def test_an_absent_firmware_holds_up_no_close_and_hears_of_it_when_back(
    remote: Remote,
) -> None:
    r = remote
    va, _ = r.vfs
    a = await r.client(A)
    fd = await a.open_device(va.name)
    await r.fw_server.stop(0)

    async def down() -> bool:
        return not r.link.up

    assert await eventually(down)
    started = time.monotonic()
    await a.close(fd)  # close_device's commands fail; the close does not
    assert time.monotonic() - started < HOLDERS_WAIT
    # Another principal may open it now (its open fails on the absent firmware,
    # not as EBUSY).
    assert r.driver.registry.devices[va.name].core.group.opened_by is None

    # The old firmware comes back (a network partition healed): it hears that
    # nobody holds the VF any more.
    r.fw.holders[va.vhca_id] = frozenset({r.pki.principal(A)})
    stale = r.fw
    r.fw_server = FirmwareServer(stale, roles=r.pki.roles())
    await r.fw_server.start(r.fw_address, tls_config=r.pki.server_tls())

    async def told() -> bool:
        return r.link.up and stale.holders == {}

    assert await eventually(told, timeout=10)
    await a.close_channel()
