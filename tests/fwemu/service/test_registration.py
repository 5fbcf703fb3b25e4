"""fwemu's server adds its handlers as generic handlers only, as the
driver's does (grpcsvc.generic: grpc.aio costs each call O(registered
methods)), and answers as before."""

from __future__ import annotations

import grpc
import pytest

from fwemu.api.v1 import firmware_pb2 as fpb
from fwemu.api.v1 import firmware_pb2_grpc as fgrpc
from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from fwemu.link.ifc import VfConfig
from fwemu.model import Firmware, VirtualClock
from fwemu.service.server import FIRMWARE_SERVICE, FirmwareServer
from tests.support.registrations import (  # noqa: F401  (registrations: a fixture)
    assert_unknown_method_unimplemented,
    registrations,
)

pytestmark = pytest.mark.grpc


async def test_fwemu_registers_no_method_handlers_and_answers_as_before(
    registrations: list[str],  # noqa: F811
) -> None:
    fw = Firmware(VirtualClock(), seed=3)
    (vf,) = fw.create_vfs(1, VfConfig(size=1 << 20))
    vhca = vf.vhca_id
    server = FirmwareServer(fw)
    port = await server.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            vfs = await sgrpc.ScenarioStub(ch).ListVfs(spb.ListVfsRequest(), timeout=5)
            assert [v.vhca_id for v in vfs.vfs] == [vhca]
            answer = await fgrpc.FirmwareStub(ch).QueryVhcaMigrationState(
                fpb.QueryVhcaMigrationStateRequest(vhca_id=vhca), timeout=5
            )
            assert answer.status == 0
            await assert_unknown_method_unimplemented(ch, FIRMWARE_SERVICE)
    finally:
        await server.stop(0)
    assert registrations == []
