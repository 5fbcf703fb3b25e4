"""The Scenario RPCs of issue 13 on the wire (a real FirmwareServer in the
run's mode, raw stubs as the admin): ReconfigureRequest.mode (UNSPECIFIED is
ADD, as for a client from before the field), ResetVf, and the VfConfig and
VfInfo fields of the automatic reconfigurations."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from fwemu.link.ifc import KiB, VfConfig
from fwemu.model import Firmware, VirtualClock
from fwemu.service.server import FirmwareServer
from grpcsvc.errors import error_info
from tests.support import tls_mode

pytestmark = pytest.mark.grpc

VF = VfConfig(size=128 * KiB, dirty_bytes_per_s=0, reconfig_bytes=8 * KiB)
Served = tuple[Firmware, sgrpc.ScenarioStub]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    fw = Firmware(VirtualClock(), seed=1)
    fw.create_vfs(1, VF)
    server = FirmwareServer(fw, roles=tls_mode.roles())
    target = await tls_mode.start(server)
    channel = tls_mode.channel(target)
    try:
        yield fw, sgrpc.ScenarioStub(channel)
    finally:
        await channel.close(None)
        tls_mode.stopped(target)
        await server.stop(0)


@pytest.mark.parametrize(
    ("mode", "grows"),
    [
        (spb.RECONFIGURE_MODE_UNSPECIFIED, True),
        (spb.RECONFIGURE_MODE_ADD, True),
        (spb.RECONFIGURE_MODE_REPLACE, False),
        (spb.RECONFIGURE_MODE_REMOVE, False),
    ],
    ids=["unspecified", "add", "replace", "remove"],
)
async def test_reconfigure_modes_on_the_wire(served: Served, mode: int, grows: bool) -> None:
    _, stub = served
    objects = [spb.ObjectSpec(type="CQ", size=4 * KiB)]
    await stub.Reconfigure(spb.ReconfigureRequest(vhca_id=1, objects=objects, now=True, mode=mode))
    info = await stub.GetVf(spb.GetVfRequest(vhca_id=1))
    assert info.reconfigurations == 1
    assert info.state_size == VF.size + (4 * KiB if grows else 0)


async def test_an_unknown_mode_is_invalid_argument_and_changes_nothing(served: Served) -> None:
    fw, stub = served
    digest = fw.digest(1)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Reconfigure(spb.ReconfigureRequest(vhca_id=1, now=True, mode=7))
    info = error_info(e.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT and "mode" in info.message
    assert fw.digest(1) == digest and fw.info(1).reconfigurations == 0


async def test_rate_and_mode_in_vf_config_and_vf_info(served: Served) -> None:
    """Unset, the rate is 0 and the mode REPLACE; CreateVfs and ConfigureVf set
    them; a NaN rate is refused naming the field."""
    fw, stub = served
    info = await stub.GetVf(spb.GetVfRequest(vhca_id=1))
    assert (info.reconfig_rate_per_s, info.reconfig_mode) == (0.0, spb.RECONFIGURE_MODE_REPLACE)
    config = spb.VfConfig(size=64 * KiB, reconfig_rate_per_s=3.5)
    [made] = (await stub.CreateVfs(spb.CreateVfsRequest(count=1, config=config))).vfs
    assert (made.reconfig_rate_per_s, made.state_size) == (3.5, 64 * KiB)
    config = spb.VfConfig(reconfig_mode=spb.RECONFIGURE_MODE_ADD)
    info = await stub.ConfigureVf(spb.ConfigureVfRequest(vhca_id=made.vhca_id, config=config))
    assert (info.reconfig_rate_per_s, info.reconfig_mode) == (3.5, spb.RECONFIGURE_MODE_ADD)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        bad = spb.VfConfig(reconfig_rate_per_s=float("nan"))
        await stub.ConfigureVf(spb.ConfigureVfRequest(vhca_id=1, config=bad))
    assert error_info(e.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert "reconfig_rate_per_s must be between 0 and 1000" in e.value.details()
    assert fw.vf(1).config.reconfig_rate_per_s == 0.0


async def test_reset_vf_answers_the_vf_as_created(served: Served) -> None:
    fw, stub = served
    fresh = fw.digest(1)
    await stub.Reconfigure(spb.ReconfigureRequest(vhca_id=1, now=True))
    info = await stub.ResetVf(spb.ResetVfRequest(vhca_id=1))
    assert (info.vhca_id, info.state_size, info.reconfigurations) == (1, VF.size, 1)
    assert (await stub.GetDigest(spb.GetDigestRequest(vhca_id=1))).digest == fresh
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ResetVf(spb.ResetVfRequest(vhca_id=2))
    assert error_info(e.value).reason == "NO_SUCH_VF"
