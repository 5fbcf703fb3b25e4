"""The Ioctl stream: DeviceFeature, PrecopyInfo and CloseFd in band, one at a time in
order, each answered as its unary RPC is (the same answer, the same errno and
message), an errno not ending the stream; several streams side by side as
threads are.  Across real gRPC servers, over the in-process firmware and over
a `fwemu serve` process."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver.api.v1 import vfio_pb2 as pb
from driver.service.servicer import MAX_IOCTL_STREAMS
from driver.vfio.uapi import MIG_STATE, Feature, MigState
from driver.vfio.uapi import VFIO_DEVICE_FEATURE_PROBE as PROBE
from fwemu.link.ifc import Fault, FaultKind, Opcode
from grpcsvc.errors import error_info
from tests.support.driver_service import GET, SET, DriverUnderTest, VfioCallError, VfioClient

pytestmark = pytest.mark.grpc


class Lane:
    """One raw Ioctl stream of a test client."""

    def __init__(self, client: VfioClient) -> None:
        self.call: Any = client.stub.Ioctl(metadata=client.metadata)

    async def ask(self, request: pb.IoctlRequest) -> pb.IoctlAnswer:
        await self.call.write(request)
        answer = await self.call.read()
        assert isinstance(answer, pb.IoctlAnswer), answer
        return answer

    async def end(self) -> None:
        """Half-close: the call ends OK once every answer was read."""
        await self.call.done_writing()
        assert await self.call.read() is grpc.aio.EOF
        assert await self.call.code() == grpc.StatusCode.OK


@pytest.fixture(name="lane")
async def lane_fixture(client: VfioClient) -> AsyncIterator[Lane]:
    lane = Lane(client)
    yield lane
    lane.call.cancel()


def feature(fd: int, flags: int, data: bytes = b"", argsz: int | None = None) -> pb.IoctlRequest:
    return pb.IoctlRequest(
        device_feature=pb.DeviceFeatureRequest(
            fd=fd, flags=flags, data=data, argsz=8 + len(data) if argsz is None else argsz
        )
    )


def precopy(fd: int, argsz: int = 24, flags: int = 0) -> pb.IoctlRequest:
    return pb.IoctlRequest(precopy_info=pb.PrecopyInfoRequest(fd=fd, argsz=argsz, flags=flags))


def close(fd: int) -> pb.IoctlRequest:
    return pb.IoctlRequest(close_fd=pb.CloseFdRequest(fd=fd))


def get_state(fd: int) -> pb.IoctlRequest:
    return feature(fd, GET | Feature.MIG_DEVICE_STATE, bytes(MIG_STATE.size))


def set_state(fd: int, state: MigState) -> pb.IoctlRequest:
    return feature(fd, SET | Feature.MIG_DEVICE_STATE, MIG_STATE.pack(state, 0))


async def unary(client: VfioClient, request: pb.IoctlRequest) -> pb.IoctlAnswer:
    """The same request as its unary RPC, its answer in the stream's form."""
    which = request.WhichOneof("ioctl")
    rpc = {
        "device_feature": client.stub.DeviceFeature,
        "precopy_info": client.stub.PrecopyInfo,
        "close_fd": client.stub.CloseFd,
    }
    try:
        answer = await client._call(rpc[which], getattr(request, which))
    except VfioCallError as e:
        return pb.IoctlAnswer(error=pb.ErrorAnswer(errno=e.errno, message=e.strerror))
    return pb.IoctlAnswer(**{which: answer})


def comparable(answer: pb.IoctlAnswer) -> pb.IoctlAnswer:
    """An answer as the unary RPC can give it (its status has no errno name
    or operation; the message the same)."""
    out = pb.IoctlAnswer()
    out.CopyFrom(answer)
    if out.HasField("error"):
        out.error.errno_name = ""
        out.error.operation = ""
    return out


def errno_in(answer: pb.IoctlAnswer) -> int:
    assert answer.WhichOneof("answer") == "error", answer
    return answer.error.errno


async def test_a_migration_arc_on_the_stream_then_half_close_ends_ok(
    drv: DriverUnderTest, client: VfioClient, lane: Lane
) -> None:
    _, fd = await drv.open_vf(client)
    a = await lane.ask(set_state(fd, MigState.PRE_COPY))
    data_fd = a.device_feature.data_fd
    assert data_fd > fd and MIG_STATE.unpack(a.device_feature.data)[1] == data_fd
    info = (await lane.ask(precopy(data_fd))).precopy_info
    assert info.argsz == 24 and info.initial_bytes > 0
    # An errno in band, and the stream goes on.
    assert errno_in(await lane.ask(precopy(fd))) == errno.ENOTTY
    no_such_state = feature(fd, SET | Feature.MIG_DEVICE_STATE, MIG_STATE.pack(99, 0))
    assert errno_in(await lane.ask(no_such_state)) == errno.EINVAL
    got = await lane.ask(get_state(fd))
    assert MIG_STATE.unpack(got.device_feature.data)[0] == MigState.PRE_COPY
    assert (await lane.ask(set_state(fd, MigState.RUNNING))).device_feature.data_fd == -1
    await lane.end()


async def test_an_error_answer_names_its_errno_and_operation(
    drv: DriverUnderTest, client: VfioClient, lane: Lane
) -> None:
    _, fd = await drv.open_vf(client)
    a = await lane.ask(set_state(fd + 100, MigState.STOP))
    assert a.error.errno == errno.EBADF and a.error.errno_name == "EBADF"
    assert a.error.operation == "set_state" and a.error.message
    a = await lane.ask(precopy(fd))
    assert (a.error.errno_name, a.error.operation) == ("ENOTTY", "precopy_info")


async def test_close_on_the_stream_closes_as_close_fd_does(
    drv: DriverUnderTest, client: VfioClient, lane: Lane
) -> None:
    """close(2) in band: the data fd goes (the next call on it is EBADF), a
    second close is EBADF in band (operation "close") as the unary RPC's,
    and a device fd closes too."""
    _, fd = await drv.open_vf(client)
    data_fd = (await lane.ask(set_state(fd, MigState.PRE_COPY))).device_feature.data_fd
    assert (await lane.ask(close(data_fd))).WhichOneof("answer") == "close_fd"
    assert errno_in(await lane.ask(precopy(data_fd))) == errno.EBADF
    a = await lane.ask(close(data_fd))
    assert (a.error.errno, a.error.operation) == (errno.EBADF, "close")
    assert comparable(a) == await unary(client, close(data_fd))
    assert (await lane.ask(close(fd))).WhichOneof("answer") == "close_fd"
    assert errno_in(await lane.ask(get_state(fd))) == errno.EBADF
    await lane.end()


@pytest.mark.parametrize("bad", [-1, -(2**31), 2**31 - 1, 1000])
async def test_a_close_of_an_absurd_fd_is_ebadf_in_band_and_the_stream_goes_on(
    drv: DriverUnderTest, client: VfioClient, lane: Lane, bad: int
) -> None:
    """Any int32 a client sends as the fd: EBADF, as the unary CloseFd
    answers, nothing of the caller's closed, and the stream goes on."""
    _, fd = await drv.open_vf(client)
    a = await lane.ask(close(bad))
    assert (a.error.errno, a.error.operation) == (errno.EBADF, "close")
    assert comparable(a) == await unary(client, close(bad))
    got = await lane.ask(get_state(fd))
    assert MIG_STATE.unpack(got.device_feature.data)[0] == MigState.RUNNING
    await lane.end()


async def test_a_request_naming_no_ioctl_is_einval_and_the_stream_goes_on(
    drv: DriverUnderTest, client: VfioClient, lane: Lane
) -> None:
    _, fd = await drv.open_vf(client)
    a = await lane.ask(pb.IoctlRequest())
    assert (a.error.errno, a.error.operation) == (errno.EINVAL, "ioctl")
    a = await lane.ask(get_state(fd))
    assert MIG_STATE.unpack(a.device_feature.data)[0] == MigState.RUNNING
    await lane.end()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from(["device", "data", "bad"]),
    flags=st.integers(0, 0xFFFF_FFFF),
    argsz=st.integers(0, 64),
    data=st.binary(max_size=24),
    as_precopy=st.booleans(),
)
async def test_every_answer_is_the_unary_rpcs_own(
    opened_pair: tuple[VfioClient, int, int],
    which: str,
    flags: int,
    argsz: int,
    data: bytes,
    as_precopy: bool,
) -> None:
    """Requests that change nothing (GET, PROBE; PRECOPY_INFO outside
    PRE_COPY) on a device fd, a data fd and a bad fd: the stream answers what
    the unary RPC answers, errno and message included."""
    client, fd, data_fd = opened_pair
    target = {"device": fd, "data": data_fd, "bad": data_fd + 7}[which]
    if as_precopy:
        request = precopy(target, argsz=argsz, flags=flags)
    else:
        request = feature(target, (flags & ~SET) | GET | PROBE * (flags & 1), data, argsz)
    lane = Lane(client)
    try:
        assert comparable(await lane.ask(request)) == await unary(client, request)
    finally:
        lane.call.cancel()


@pytest.fixture(name="opened_pair")
async def opened_pair_fixture(
    drv: DriverUnderTest, client: VfioClient
) -> tuple[VfioClient, int, int]:
    """A device in STOP_COPY with its data fd: its answers do not change."""
    _, fd = await drv.open_vf(client)
    await client.set_state(fd, MigState.STOP)
    data_fd = await client.set_state(fd, MigState.STOP_COPY)
    return client, fd, data_fd


async def test_two_streams_run_side_by_side_as_threads_do(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """An ioctl held by the firmware (a SUSPEND that takes 1 s) on one stream
    does not hold another device's ioctls on another stream."""
    (slow, quick) = await drv.create_vfs(2)
    slow_fd = await client.open_device(slow.name)
    quick_fd = await client.open_device(quick.name)
    await drv.link.inject_fault(
        slow.vhca_id, Fault(FaultKind.DELAY, opcode=Opcode.SUSPEND_VHCA, delay_s=1.0)
    )
    a, b = Lane(client), Lane(client)
    try:
        held = asyncio.ensure_future(a.ask(set_state(slow_fd, MigState.STOP)))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        for _ in range(5):
            got = await b.ask(get_state(quick_fd))
            assert MIG_STATE.unpack(got.device_feature.data)[0] == MigState.RUNNING
        assert time.monotonic() - t0 < 0.8 and not held.done()
        assert (await held).device_feature.data_fd == -1
    finally:
        a.call.cancel()
        b.call.cancel()


async def test_a_client_gone_mid_ioctl_leaves_the_ioctl_done(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """A stream cancelled while its ioctl waits on the firmware: the ioctl
    runs to its end (as a unary call's does), and the device is in its new
    state for the next call."""
    vf, fd = await drv.open_vf(client)
    await drv.link.inject_fault(
        vf.vhca_id, Fault(FaultKind.DELAY, opcode=Opcode.SUSPEND_VHCA, delay_s=0.3)
    )
    lane = Lane(client)
    asking = asyncio.ensure_future(lane.ask(set_state(fd, MigState.STOP)))
    await asyncio.sleep(0.1)
    lane.call.cancel()
    with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
        await asking
    await asyncio.sleep(0.5)
    assert await client.get_state(fd) == MigState.STOP


async def test_a_client_that_never_reads_its_answers_stops_being_read(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """Requests sent without reading a single answer: the driver stops reading
    them once the stream's flow-control windows are full (what one stream
    holds stays bounded), and another client's ioctls are answered meanwhile."""
    vf, fd = await drv.open_vf(client)
    flood = Lane(client)
    # Each answer carries its request's 256 KiB of user memory back: the
    # client's receive window fills after a few MiB of them.
    request = get_state(fd)
    request.device_feature.user_memory.append(pb.UserBuffer(addr=1 << 20, data=bytes(256 << 10)))
    sent = 0
    try:
        with pytest.raises(TimeoutError):
            for _ in range(1_000):
                await asyncio.wait_for(flood.call.write(request), 1.0)
                sent += 1
        assert 0 < sent < 1_000
        other = await VfioClient.connect(drv.target)
        try:
            lane = Lane(other)
            ofd = await other.open_device((await drv.create_vfs())[0].name)
            got = await lane.ask(get_state(ofd))
            assert MIG_STATE.unpack(got.device_feature.data)[0] == MigState.RUNNING
            lane.call.cancel()
        finally:
            await other.close_channel()
    finally:
        flood.call.cancel()
    # The flooding client's own calls still work once it stops.
    assert await client.get_state(fd) == MigState.RUNNING
    del vf


async def test_a_client_has_at_most_max_ioctl_streams_the_next_is_eagain(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """As threads past RLIMIT_NPROC: the stream past the limit ends at once
    with EAGAIN; one closed makes room; another client is not limited by it."""
    _, fd = await drv.open_vf(client)
    get = get_state(fd)
    lanes = [Lane(client) for _ in range(MAX_IOCTL_STREAMS)]
    try:
        for lane in lanes:  # each one open and answering
            assert (await lane.ask(get)).WhichOneof("answer") == "device_feature"
        extra = Lane(client)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await extra.ask(get)
        assert error_info(caught.value).metadata["errno"] == str(errno.EAGAIN)
        other = await VfioClient.connect(drv.target)
        try:
            ofd = await other.open_device((await drv.create_vfs())[0].name)
            olane = Lane(other)
            assert (await olane.ask(get_state(ofd))).WhichOneof("answer") == "device_feature"
            olane.call.cancel()
        finally:
            await other.close_channel()
        await lanes.pop().end()
        lanes.append(Lane(client))
        assert (await lanes[-1].ask(get)).WhichOneof("answer") == "device_feature"
    finally:
        for lane in lanes:
            lane.call.cancel()
