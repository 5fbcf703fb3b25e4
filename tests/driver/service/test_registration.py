"""The driver's server adds its handlers as generic handlers only: grpc.aio
waits on a request task per registered method for every call it accepts
(grpcsvc.generic), which cost each Vfio call ~20 us with the driver's 36."""

from __future__ import annotations

import grpc
import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.api.v1 import vfio_pb2_grpc as pbg
from driver.registry import DeviceRegistry
from driver.service.server import VFIO_SERVICE, DriverServer
from fwemu.embedded import EmbeddedFirmware
from tests.support.registrations import (  # noqa: F401  (registrations: a fixture)
    assert_unknown_method_unimplemented,
    registrations,
)

pytestmark = pytest.mark.grpc


async def test_the_driver_registers_no_method_handlers_and_answers_as_before(
    registrations: list[str],  # noqa: F811
) -> None:
    firmware = EmbeddedFirmware.build(size=1 << 20, dirty_rate=0, seed=1, scenario=None, vfs=1)
    server = DriverServer(DeviceRegistry(firmware.link), firmware=firmware, scenario_service=True)
    port = await server.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pbg.VfioStub(ch)
            devices = (await stub.ListDevices(pb.ListDevicesRequest(), timeout=5)).devices
            assert [d.migratable for d in devices] == [True]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.PrecopyInfo(pb.PrecopyInfoRequest(fd=3, argsz=24), timeout=5)
            assert e.value.code() != grpc.StatusCode.UNIMPLEMENTED  # EBADF, from the servicer
            await assert_unknown_method_unimplemented(ch, VFIO_SERVICE)
    finally:
        await server.stop(0)
    assert registrations == []
