"""vfioclient's Ioctl lanes (vfioclient/ioctls.py): DeviceFeature and
PrecopyInfo on the driver's Ioctl streams, one ioctl per lane at a time, the
answers and errnos those of the unary calls; a lane per ioctl in flight; the
unary calls again for a driver without the Ioctl RPC; a cancelled caller's
lane dropped, its ioctl done."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.service.servicer import MAX_IOCTL_STREAMS
from driver.vfio.uapi import VFIO_DEVICE_FEATURE_GET as GET
from driver.vfio.uapi import Feature
from fwemu.link.ifc import Fault, FaultKind, Opcode
from grpcsvc.server import CHANNEL_OPTIONS
from tests.support import tls_mode
from tests.support.driver_service import (  # noqa: F401
    DriverUnderTest,
    drv_fixture,
    fwemu_target_fixture,
)
from tests.support.driver_service import VfioClient as HarnessClient
from vfioclient import VfioClient, VfioClientError
from vfioclient.ioctls import MAX_LANES
from vfioclient.uapi import MigState

pytestmark = pytest.mark.grpc


async def connect(target: str, *, ioctl_streams: bool = True) -> VfioClient:
    return await VfioClient.connect(
        target, tls=tls_mode.client_tls(target), ioctl_streams=ioctl_streams
    )


@pytest.fixture(name="lib")
async def lib_fixture(drv: DriverUnderTest) -> AsyncIterator[VfioClient]:
    c = await connect(drv.target)
    yield c
    await c.aclose()


async def test_the_migration_calls_go_on_one_lane_and_answer_as_unary(
    drv: DriverUnderTest, lib: VfioClient
) -> None:
    (vf,) = await drv.create_vfs()
    fd = await lib.open_device(vf.name)
    assert await lib.enable_precopy_info_v2(fd)
    data_fd = await lib.set_state(fd, MigState.PRE_COPY)
    assert data_fd is not None
    info = await lib.precopy_info(data_fd)
    assert info.initial_bytes > 0 and await lib.data_size(fd) > 0
    assert await lib.get_state(fd) is MigState.PRE_COPY
    lanes = lib._ioctls
    assert lanes.enabled and lanes._open == 1 and len(lanes._idle) == 1  # one caller, one lane
    seconds = drv.server.servicer.ioctl_seconds  # vfio_ioctl_seconds, by transport
    assert seconds["set_state", "stream"].count == 1
    assert seconds["precopy_info", "stream"].count == 1
    assert seconds["device_feature", "stream"].count >= 3  # v2 opt-in, data size, GET
    assert all(h.count == 0 for (_, transport), h in seconds.items() if transport == "unary")
    async with await connect(drv.target, ioctl_streams=False) as plain:
        assert not plain._ioctls.enabled
        pfd = await plain.open_device((await drv.create_vfs())[0].name)
        # The same errno and message either way (the kernel's).
        for c, f in ((lib, fd), (plain, pfd)):
            with pytest.raises(VfioClientError) as caught:
                await c.precopy_info(f)
            assert caught.value.errno == errno.ENOTTY
            assert "data fd ioctl" in str(caught.value)
        assert plain._ioctls._open == 0
        assert seconds["precopy_info", "unary"].count == 1  # its ENOTTY, timed too
        assert seconds["precopy_info", "stream"].count == 2
    assert await lib.set_state(fd, MigState.RUNNING) is None


async def test_a_lane_per_ioctl_in_flight_then_reused(
    drv: DriverUnderTest, lib: VfioClient
) -> None:
    vfs = await drv.create_vfs(8)
    fds = [await lib.open_device(v.name) for v in vfs]
    for _ in range(3):
        states = await asyncio.gather(*(lib.get_state(fd) for fd in fds))
        assert states == [MigState.RUNNING] * len(fds)
    lanes = lib._ioctls
    assert 1 <= lanes._open <= len(fds) and len(lanes._idle) == lanes._open
    assert lanes._open <= MAX_LANES
    await lib.aclose()
    assert lanes._open == 0 and lanes.closed


async def test_a_cancelled_caller_drops_its_lane_and_its_ioctl_is_done(
    drv: DriverUnderTest, lib: VfioClient
) -> None:
    (vf,) = await drv.create_vfs()
    fd = await lib.open_device(vf.name)
    await lib.get_state(fd)  # one idle lane
    await drv.link.inject_fault(
        vf.vhca_id, Fault(FaultKind.DELAY, opcode=Opcode.SUSPEND_VHCA, delay_s=0.3)
    )
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lib.set_state(fd, MigState.STOP), 0.1)
    assert lib._ioctls._open == 0  # the lane went with its caller
    await asyncio.sleep(0.5)
    assert await lib.get_state(fd) is MigState.STOP  # on a new lane
    assert lib._ioctls._open == 1


class OldDriver:
    """A Vfio service of before the Ioctl RPC: DeviceFeature and PrecopyInfo
    only, as unary calls (every other method UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def device_feature(self, request: pb.DeviceFeatureRequest, context: Any) -> Any:
        self.calls.append("DeviceFeature")
        return pb.DeviceFeatureResponse(data=request.data, data_fd=-1)

    async def precopy_info(self, request: pb.PrecopyInfoRequest, context: Any) -> Any:
        self.calls.append("PrecopyInfo")
        return pb.PrecopyInfoResponse(argsz=request.argsz, initial_bytes=7, dirty_bytes=9)


async def test_a_driver_without_the_ioctl_rpc_gets_unary_calls() -> None:
    old = OldDriver()
    handler = grpc.method_handlers_generic_handler(
        "vfio.v1.Vfio",
        {
            "DeviceFeature": grpc.unary_unary_rpc_method_handler(
                old.device_feature,
                pb.DeviceFeatureRequest.FromString,
                pb.DeviceFeatureResponse.SerializeToString,
            ),
            "PrecopyInfo": grpc.unary_unary_rpc_method_handler(
                old.precopy_info,
                pb.PrecopyInfoRequest.FromString,
                pb.PrecopyInfoResponse.SerializeToString,
            ),
        },
    )
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    c = VfioClient(f"127.0.0.1:{port}", tls=None)  # no Session on this one
    try:
        info = await c.precopy_info(3)
        assert (info.initial_bytes, info.dirty_bytes) == (7, 9)
        assert not c._ioctls.enabled and c._ioctls._open == 0
        assert await c.get_state(3) is MigState.ERROR  # GET's zeroed struct, echoed
        assert old.calls == ["PrecopyInfo", "DeviceFeature"]  # each made once
    finally:
        await c.aclose()
        await server.stop(None)


async def test_an_idle_lane_that_ended_is_replaced_without_resending(
    drv: DriverUnderTest, lib: VfioClient
) -> None:
    """A lane whose stream ended while idle (a broken connection, a driver
    restarted: here cancelled): the next ioctl goes on a new lane, once."""
    (vf,) = await drv.create_vfs()
    fd = await lib.open_device(vf.name)
    await lib.get_state(fd)
    (idle,) = lib._ioctls._idle
    idle.call.cancel()
    assert await lib.set_state(fd, MigState.STOP) is None
    assert await lib.get_state(fd) is MigState.STOP
    assert lib._ioctls._open == 1 and lib._ioctls._idle[0] is not idle


async def test_a_stream_refused_for_the_client_limit_makes_that_call_unary(
    drv: DriverUnderTest,
) -> None:
    """Another holder of the same client id has the driver's most Ioctl
    streams open: the library's ioctl is made as a unary call instead
    (answered the same), and the lanes stay on for later."""
    (vf,) = await drv.create_vfs()
    raw = await HarnessClient.connect(drv.target)
    lib = await VfioClient.connect(
        drv.target, client_id=raw.client_id, tls=tls_mode.client_tls(drv.target)
    )
    calls: list[Any] = []
    try:
        fd = await lib.open_device(vf.name)
        request = pb.IoctlRequest(
            device_feature=pb.DeviceFeatureRequest(
                fd=fd, argsz=16, flags=GET | Feature.MIG_DEVICE_STATE, data=bytes(8)
            )
        )
        for _ in range(MAX_IOCTL_STREAMS):
            call = raw.stub.Ioctl(metadata=raw.metadata)
            calls.append(call)
            await call.write(request)
            assert (await call.read()).WhichOneof("answer") == "device_feature"
        assert await lib.get_state(fd) is MigState.RUNNING
        assert lib._ioctls.enabled and lib._ioctls._open == 0
    finally:
        for call in calls:
            call.cancel()
        await lib.aclose()
        await raw.close_channel()
