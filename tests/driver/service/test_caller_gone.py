"""An ioctl runs to its end when its caller goes away (a deadline, a killed
client): the gRPC handler is cancelled, the system call is not.

Cut in the middle of the SAVE that RUNNING -> PRE_COPY or a PRECOPY_INFO
issues, the driver used to leave a data buffer on no list (its mkey and its
budget charge never given back) and a device half way through an arc.  Now
the call finishes unobserved: the arc completes, the SAVE's record is queued,
and once the client closes its fds nothing of it is left.
"""

from __future__ import annotations

import asyncio
import errno

import grpc
import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.vfio.uapi import MIG_STATE, Feature, MigState
from fwemu.link.ifc import Fault, FaultKind, Opcode
from tests.support.driver_service import (
    GET,
    SET,
    DriverUnderTest,
    VfioCallError,
    VfioClient,
    eventually,
)

pytestmark = pytest.mark.grpc

DELAY = 0.6  # the SAVE's answer; the caller gives up long before
DEADLINE = 0.1


async def delay_next_save(drv: DriverUnderTest, vhca_id: int) -> None:
    fault = Fault(FaultKind.DELAY, opcode=Opcode.SAVE_VHCA_STATE, delay_s=DELAY)
    await drv.link.inject_fault(vhca_id, fault)


async def deadline_exceeded(client: VfioClient, rpc: str, request: object) -> None:
    """`rpc` with a deadline that passes while the firmware holds its SAVE."""
    call = getattr(client.stub, rpc)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request, metadata=client.metadata, timeout=DEADLINE)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def to_pre_copy(fd: int) -> pb.DeviceFeatureRequest:
    """MIG_DEVICE_STATE SET PRE_COPY, raw: its arc SAVEs the initial data."""
    return pb.DeviceFeatureRequest(
        fd=fd,
        argsz=8 + MIG_STATE.size,
        flags=SET | Feature.MIG_DEVICE_STATE,
        data=MIG_STATE.pack(MigState.PRE_COPY, 0),
    )


async def nothing_held(drv: DriverUnderTest) -> bool:
    """No client has a data buffer charged (every mkey of theirs destroyed)."""
    return not drv.server.registry.budget.held


async def test_a_set_state_whose_caller_went_away_completes_its_arc(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    vf, fd = await drv.open_vf(client)
    await delay_next_save(drv, vf.vhca_id)
    await deadline_exceeded(client, "DeviceFeature", to_pre_copy(fd))
    # GET waits for the state mutex, i.e. for the arc the dead call began.
    got = await client.device_feature(
        fd, 8 + MIG_STATE.size, GET | Feature.MIG_DEVICE_STATE, MIG_STATE.pack(0, -1)
    )
    assert MigState(MIG_STATE.unpack(got.data)[0]) == MigState.PRE_COPY
    # Its data fd is in the table (the next fd after the device's): usable, closable.
    data_fd = fd + 1
    info = await client.precopy_info(data_fd)
    assert info.initial_bytes > 0
    await client.close(data_fd)
    await client.set_state(fd, MigState.RUNNING)
    await client.close(fd)
    assert await eventually(lambda: nothing_held(drv))


async def test_a_precopy_info_whose_caller_went_away_queues_its_save(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    (vf,) = await drv.create_vfs(dirty_bytes_per_s=64 << 20)  # dirty pages to SAVE
    fd = await client.open_device(vf.name)
    data_fd = await client.set_state(fd, MigState.PRE_COPY)
    _, ended = await client.read_all(data_fd)  # the initial bytes, to ENOMSG
    assert ended is not None and ended.errno == errno.ENOMSG
    await asyncio.sleep(0.05)  # the workload dirties pages: the next query SAVEs them
    await delay_next_save(drv, vf.vhca_id)
    await deadline_exceeded(client, "PrecopyInfo", pb.PrecopyInfoRequest(fd=data_fd, argsz=24))
    # The next answer waits for the state mutex; the dead call's SAVE then
    # lands on the stream, and reading it works.
    await client.precopy_info(data_fd)
    chunks, ended = await client.read_all(data_fd)
    assert sum(map(len, chunks)) > 0
    await client.close(data_fd)
    await client.set_state(fd, MigState.RUNNING)
    await client.close(fd)
    assert await eventually(lambda: nothing_held(drv))


async def test_a_device_closed_by_a_caller_that_went_away_is_closed(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """close(2) of a device in PRE_COPY waits for its SAVE in flight: a caller
    that gives up still leaves the device closed and its buffers freed."""
    vf, fd = await drv.open_vf(client)
    await delay_next_save(drv, vf.vhca_id)
    await deadline_exceeded(client, "DeviceFeature", to_pre_copy(fd))
    await deadline_exceeded(client, "CloseFd", pb.CloseFdRequest(fd=fd))

    async def closed() -> bool:
        return drv.registered(vf).core.open_count == 0

    assert await eventually(closed)
    # The dead SET installed its data fd once its arc ended: in the lowest
    # free slot, the device's, which close(2) had already freed.
    await client.close(fd)
    with pytest.raises(VfioCallError) as nothing_more:
        await client.close(fd + 1)
    assert nothing_more.value.errno == errno.EBADF
    assert await eventually(lambda: nothing_held(drv))
