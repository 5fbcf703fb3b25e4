"""GrpcLink over mutual TLS (issue 12, item 1): with the driver's certificate
it migrates a VF (SAVE, LOAD) in both host memory modes and says who holds a
VF; a tenant's certificate, or none, cannot make it a firmware link."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fwemu.link.base import LinkError
from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import SaveCompletion, SuspendOpMod, VfConfig
from fwemu.model import Firmware, VirtualClock
from fwemu.service.server import FirmwareServer
from tests.support.tls import DRIVER, Pki

pytestmark = pytest.mark.grpc

VF = VfConfig(size=128 * 1024, dirty_bytes_per_s=0)


@pytest.fixture
async def served(pki: Pki) -> AsyncIterator[tuple[Firmware, str]]:
    fw = Firmware(VirtualClock(), seed=5)
    fw.create_vfs(2, VF)
    server = FirmwareServer(fw, roles=pki.roles())
    port = await server.start("127.0.0.1:0", tls_config=pki.server_tls())
    yield fw, f"127.0.0.1:{port}"
    await server.stop(0)


async def _suspend(link: GrpcLink, vhca_id: int) -> None:
    for op_mod in (SuspendOpMod.SUSPEND_INITIATOR, SuspendOpMod.SUSPEND_RESPONDER):
        assert (await link.suspend_vhca(vhca_id, op_mod=op_mod)).ok


@pytest.mark.parametrize("memory", ["shm", "remote"])
async def test_the_drivers_link_saves_and_loads_over_mutual_tls(
    served: tuple[Firmware, str], pki: Pki, memory: str
) -> None:
    fw, target = served
    link = await GrpcLink.connect(
        target,
        memory=memory,  # type: ignore[arg-type]
        tls=pki.client_tls(DRIVER),
    )
    try:
        await _suspend(link, 1)
        await _suspend(link, 2)
        src = await link.alloc_buffer(256 * 1024)
        done: asyncio.Future[SaveCompletion] = asyncio.get_running_loop().create_future()
        accepted = await link.save_vhca_state(
            1, mkey=src.mkey, size=src.length, callback=done.set_result
        )
        assert accepted.ok, accepted
        fw.advance_clock(0)
        c = await asyncio.wait_for(done, 5)
        assert c.status == 0 and c.actual_image_size > VF.size
        await link.dma_sync_for_cpu(src, 0, c.actual_image_size)
        image = bytes(src.view[: c.actual_image_size])
        dst = await link.alloc_buffer(len(image))
        dst.view[:] = image
        await link.dma_sync_for_device(dst, 0, len(image))
        loaded = await link.load_vhca_state(2, mkey=dst.mkey, size=len(image))
        assert loaded.ok, loaded
        assert fw.digest(2) == fw.digest(1)
    finally:
        await link.close()


async def test_the_drivers_link_says_who_holds_a_vf(served: tuple[Firmware, str], pki: Pki) -> None:
    fw, target = served
    link = await GrpcLink.connect(target, tls=pki.client_tls(DRIVER))
    try:
        team_a = pki.principal("team-a")
        await link.set_vf_holders(1, frozenset({team_a}))
        assert fw.holders == {1: frozenset({team_a})}
        await link.set_vf_holders(1, frozenset())
        assert fw.holders == {}
        with pytest.raises(LinkError, match="no VF with vhca_id 9"):
            await link.set_vf_holders(9, frozenset({team_a}))
    finally:
        await link.close()


async def test_a_tenants_certificate_makes_no_firmware_link(
    served: tuple[Firmware, str], pki: Pki
) -> None:
    _, target = served
    with pytest.raises(LinkError, match="PERMISSION_DENIED"):
        await GrpcLink.connect(target, tls=pki.client_tls("team-a"), timeout=5)


async def test_without_a_client_certificate_mutual_tls_refuses_the_link(
    served: tuple[Firmware, str], pki: Pki
) -> None:
    _, target = served
    with pytest.raises(LinkError, match="cannot reach the firmware"):
        await GrpcLink.connect(target, tls=pki.client_tls(None), timeout=2)
    with pytest.raises(LinkError, match="cannot reach the firmware"):
        await GrpcLink.connect(target, timeout=2)  # plaintext to a TLS port
