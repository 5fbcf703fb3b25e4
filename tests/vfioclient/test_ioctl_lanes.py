"""vfioclient's Ioctl lanes (vfioclient/ioctls.py): DeviceFeature and
PrecopyInfo on the driver's Ioctl streams, one ioctl per lane at a time, the
answers and errnos those of the unary calls; a lane per ioctl in flight; the
unary calls again for a driver without the Ioctl RPC; a cancelled caller's
lane dropped, its ioctl done."""

from __future__ import annotations

import asyncio
import contextlib
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
from grpcsvc.options import CHANNEL_OPTIONS
from tests.support import tls_mode
from tests.support.driver_service import (  # noqa: F401
    DriverUnderTest,
    drv_fixture,
    fwemu_target_fixture,
)
from tests.support.driver_service import VfioClient as HarnessClient
from vfioclient import VfioClient, VfioClientError, calls
from vfioclient.ioctls import MAX_LANES, IoctlLanes, _Lane, _Stale, _Unsent
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


async def test_a_unary_ioctl_is_timed_before_its_answer_goes_out(
    drv: DriverUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vfio_ioctl_seconds counts a unary DeviceFeature or PrecopyInfo before
    the caller has its answer, errno or not: a scrape right after the answer
    finds it (the observation once came after the abort, and a fast client
    could miss it)."""
    import driver.service.servicer as servicer_module

    seconds = drv.server.servicer.ioctl_seconds
    at_abort: list[tuple[int, int, int]] = []
    abort = servicer_module.abort_errno

    async def counting_abort(*args: Any, **kwargs: Any) -> Any:
        at_abort.append(
            (
                seconds["precopy_info", "unary"].count,
                seconds["device_feature", "unary"].count,
                seconds["set_state", "unary"].count,
            )
        )
        return await abort(*args, **kwargs)

    monkeypatch.setattr(servicer_module, "abort_errno", counting_abort)
    async with await connect(drv.target, ioctl_streams=False) as plain:
        fd = await plain.open_device((await drv.create_vfs())[0].name)
        for call in (
            plain.precopy_info,  # ENOTTY: a device fd
            lambda f: plain.device_feature(f, GET | 99),  # ENOTTY: no such feature
            lambda f: plain.set_state(f, MigState.ERROR),  # EINVAL: not an arc
        ):
            with pytest.raises(VfioClientError):
                await call(fd)
        ok = await plain.get_state(fd)
    assert ok is MigState.RUNNING
    assert at_abort == [(1, 0, 0), (1, 1, 0), (1, 1, 1)]
    assert seconds["device_feature", "unary"].count == 2  # the GET's success, too


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


# --- sequences: several ioctls, one thread's, in one round trip -------------------------


async def test_a_sequence_answers_as_its_calls_one_by_one_and_a_failure_stops_nothing(
    drv: DriverUnderTest, lib: VfioClient
) -> None:
    """QEMU's pending_exact (MIG_DATA_SIZE, then PRECOPY_INFO) as one
    sequence: each answer, errno and message included, is what the call
    alone answers, on the lanes and on unary calls; an ioctl that fails
    (EBADF, ENOTTY) does not stop the one after it."""
    (vf,) = await drv.create_vfs()
    fd = await lib.open_device(vf.name)
    assert await lib.enable_precopy_info_v2(fd)
    data_fd = await lib.set_state(fd, MigState.PRE_COPY)
    assert data_fd is not None
    seconds = drv.server.servicer.ioctl_seconds
    before = seconds["precopy_info", "stream"].count
    cases = [
        (calls.data_size(fd), calls.precopy_info(data_fd)),
        (calls.data_size(99), calls.precopy_info(data_fd)),  # EBADF, then an answer
        (calls.data_size(fd), calls.precopy_info(fd)),  # an answer, then ENOTTY
        (calls.get_state(fd), calls.data_size(fd), calls.precopy_info(data_fd)),
    ]
    lanes = lib._ioctls
    for seq in cases:
        got = await lib.ioctls(*seq)
        if seq is cases[1]:
            assert isinstance(got[0], VfioClientError) and got[0].errno == errno.EBADF
            assert got[1].initial_bytes > 0
        if seq is cases[2]:
            assert got[0] > 0 and got[1].errno == errno.ENOTTY
        lanes.enabled = False  # the same client's unary calls
        try:
            unary = await lib.ioctls(*seq)
            alone = []
            for c in seq:  # the same calls, one by one
                try:
                    alone.append(await lib._unary(c))
                except VfioClientError as e:
                    alone.append(e)
        finally:
            lanes.enabled = True
        for answers in (got, unary):
            assert [_key(a) for a in answers] == [_key(a) for a in alone]
    assert seconds["precopy_info", "stream"].count == before + 4  # on the lanes
    assert seconds["precopy_info", "unary"].count == 8
    assert lanes._open == 1  # one lane: the errors came in band
    with pytest.raises(ValueError):
        await lib.ioctls(calls.open_device(vf.name))


def _key(a: Any) -> Any:
    return ("errno", a.errno, str(a)) if isinstance(a, VfioClientError) else a


class HeldIoctls:
    """An Ioctl RPC that answers nothing until it has read `wait_for`
    requests (or `patience` passed): a client that waits for each answer
    before it sends the next is found out."""

    def __init__(self, wait_for: int, patience: float = 1.0, at_once: int = 0) -> None:
        self.wait_for, self.patience, self.at_once = wait_for, patience, at_once
        self.read_before_first_answer = 0

    async def ioctl(self, requests: AsyncIterator[pb.IoctlRequest], context: Any) -> Any:
        q: asyncio.Queue[pb.IoctlRequest | None] = asyncio.Queue()

        async def read() -> None:  # (a read of the call is never cancelled)
            async for r in requests:
                q.put_nowait(r)
            q.put_nowait(None)

        reader = asyncio.ensure_future(read())
        for _ in range(self.at_once):  # these answered as they come
            first = await q.get()
            if first is None:
                await reader
                return
            yield _echo(first)
        held: list[pb.IoctlRequest | None] = [await q.get()]
        with contextlib.suppress(TimeoutError):
            while len(held) < self.wait_for and held[-1] is not None:
                held.append(await asyncio.wait_for(q.get(), self.patience))
        self.read_before_first_answer = len([r for r in held if r is not None])
        while True:
            for r in held:
                if r is None:
                    await reader
                    return
                yield _echo(r)
            held = [await q.get()]


def _echo(r: pb.IoctlRequest) -> pb.IoctlAnswer:
    if r.WhichOneof("ioctl") == "precopy_info":
        return pb.IoctlAnswer(precopy_info=pb.PrecopyInfoResponse(argsz=24, initial_bytes=5))
    f = r.device_feature
    return pb.IoctlAnswer(device_feature=pb.DeviceFeatureResponse(data=f.data, data_fd=-1))


@contextlib.asynccontextmanager
async def fake_ioctl_driver(ioctl: Any) -> AsyncIterator[str]:
    """A bare gRPC server whose only method is the Ioctl RPC `ioctl` (a
    handler of the request iterator and context): its target."""
    handler = grpc.method_handlers_generic_handler(
        "vfio.v1.Vfio",
        {
            "Ioctl": grpc.stream_stream_rpc_method_handler(
                ioctl, pb.IoctlRequest.FromString, pb.IoctlAnswer.SerializeToString
            )
        },
    )
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_a_sequence_is_sent_before_its_first_answer() -> None:
    """The point of a sequence: both requests are on the wire before the
    first answer (one round trip, not two)."""
    held = HeldIoctls(wait_for=2, at_once=1)
    async with fake_ioctl_driver(held.ioctl) as target, VfioClient(target, tls=None) as c:
        await c.data_size(3)  # the lane's first ioctl: the driver takes the stream
        size, info = await c.ioctls(calls.data_size(3), calls.precopy_info(4))
        assert held.read_before_first_answer == 2
        assert isinstance(size, int) and info.initial_bytes == 5
        # A call alone (a new stream) waits out the server's patience.
        held.patience = 0.2
        async with VfioClient(target, tls=None) as alone:
            await alone.data_size(3)
            await alone.precopy_info(4)
        assert held.read_before_first_answer == 1


async def _echo_ioctls(requests: AsyncIterator[pb.IoctlRequest], context: Any) -> Any:
    """An Ioctl RPC answering each DeviceFeature with its request's data,
    one at a time, as the driver does (it reads the next request only once
    its answer is written)."""
    async for r in requests:
        f = r.device_feature
        yield pb.IoctlAnswer(device_feature=pb.DeviceFeatureResponse(data=f.data, data_fd=-1))


async def test_a_long_sequence_of_large_ioctls_does_not_wait_on_its_own_answers() -> None:
    """64 ioctls of 1 MiB each way: written all before reading any answer,
    the driver's answers fill the client's window, the driver stops reading,
    and the client's writes wait forever.  The lane reads while it writes."""
    async with fake_ioctl_driver(_echo_ioctls) as target, VfioClient(target, tls=None) as c:
        big = [
            calls.device_feature(3, GET | Feature.MIG_DEVICE_STATE, bytes([i]) * (1 << 20))
            for i in range(64)
        ]
        answers = await asyncio.wait_for(c.ioctls(*big), 30)
        assert [a.data[:1] for a in answers] == [bytes([i]) for i in range(64)]
        assert all(len(a.data) == 1 << 20 for a in answers)
        assert await c.ioctls() == []


async def _one_then_abort(requests: AsyncIterator[pb.IoctlRequest], context: Any) -> Any:
    """Answers the first ioctl, then the stream breaks (a driver going away)."""
    async for r in requests:
        yield pb.IoctlAnswer(device_feature=pb.DeviceFeatureResponse(data=r.device_feature.data))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")


async def test_a_sequence_broken_midway_keeps_its_answers_and_fails_the_rest() -> None:
    async with fake_ioctl_driver(_one_then_abort) as target, VfioClient(target, tls=None) as c:
        seq = [
            calls.device_feature(3, GET | Feature.MIG_DEVICE_STATE, bytes([i]) * 8)
            for i in range(3)
        ]
        first, *rest = await asyncio.wait_for(c.ioctls(*seq), 10)
        assert first.data == bytes([0]) * 8
        assert len(rest) == 2 and all(isinstance(e, VfioClientError) for e in rest)
        assert [e.errno for e in rest] == [errno.ENOTCONN] * 2, rest  # UNAVAILABLE: unreachable
        assert c._ioctls._open == 0  # the broken lane is not kept


def _core_error() -> grpc.aio.AioRpcError:
    """What grpc.aio raises, and makes the call's status, for a write that
    fails because the stream is ending: it hides the peer's own status."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Internal error from Core",
    )


class StreamEndingUnderWrites:
    """A stand-in for an Ioctl call whose stream ends as it is written to:
    each of `answers` answers a request written before it; write number
    `fail_at` (0-based) fails as grpc's does, and once it has, a read past
    the answers given fails with the same INTERNAL status."""

    def __init__(self, answers: list[pb.IoctlAnswer], fail_at: int) -> None:
        self.answers = list(answers)
        self.fail_at = fail_at
        self.writes = self.given = 0
        self.changed = asyncio.Event()
        self.failed = False

    def done(self) -> bool:
        return False

    async def write(self, request: pb.IoctlRequest) -> None:
        self.changed.set()
        if self.writes == self.fail_at:
            self.failed = True
            raise _core_error()
        self.writes += 1

    async def read(self) -> pb.IoctlAnswer:
        while True:
            if self.answers and self.given < self.writes:
                self.given += 1
                return self.answers.pop(0)
            if self.failed:
                raise _core_error()
            self.changed.clear()
            await self.changed.wait()

    def cancel(self) -> None:
        pass


def _feature_requests(n: int) -> list[pb.IoctlRequest]:
    return [
        pb.IoctlRequest(device_feature=pb.DeviceFeatureRequest(fd=3, flags=GET)) for _ in range(n)
    ]


def _taken(call: Any) -> _Lane:
    """A lane the driver has answered on before."""
    lane = _Lane(call)
    lane.answered = True
    return lane


async def test_a_stream_ending_under_the_writes_fails_the_unanswered_as_unreachable() -> None:
    """grpc marks a call INTERNAL ("Internal error from Core") when a write
    fails as the stream ends, hiding the driver's status (UNAVAILABLE, the
    driver going away): the ioctls sent and not answered are ENOTCONN, the
    stream ended, not EIO with grpc's words.  (Seen in CI as a race of
    test_a_sequence_broken_midway_keeps_its_answers_and_fails_the_rest.)"""
    unreachable = (errno.ENOTCONN, "driver unreachable: the Ioctl stream ended")
    answered = pb.IoctlAnswer(device_feature=pb.DeviceFeatureResponse(data=b"x"))
    first, *rest = await _taken(StreamEndingUnderWrites([answered], fail_at=2)).ioctls(
        _feature_requests(3)
    )
    assert first is answered
    assert [(e.errno, e.strerror) for e in rest] == [unreachable] * 2  # type: ignore[union-attr]
    # No answer at all: every one of them, sent or not.
    lost = await _taken(StreamEndingUnderWrites([], fail_at=1)).ioctls(_feature_requests(3))
    assert [(e.errno, e.strerror) for e in lost] == [unreachable] * 3  # type: ignore[union-attr]


class RefusedStream(StreamEndingUnderWrites):
    """A driver refusing the stream (no Ioctl RPC): its status, once read."""

    async def read(self) -> pb.IoctlAnswer:
        await asyncio.sleep(0.05)  # the status on its way: time for writes to race it
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata()
        )


async def test_a_new_lane_writes_the_rest_once_the_driver_took_the_stream() -> None:
    """On a new lane the first ioctl's answer comes before the rest is
    written, so a refusal is read as it is (UNIMPLEMENTED: the calls are
    then made unary), never hidden by a racing write; a lane the driver
    answered on writes them all at once."""
    refused = RefusedStream([], fail_at=99)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _Lane(refused).ioctls(_feature_requests(3))  # type: ignore[arg-type]
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and refused.writes == 1
    answers = [
        pb.IoctlAnswer(device_feature=pb.DeviceFeatureResponse(data=bytes([i]))) for i in range(3)
    ]
    fresh, taken = StreamEndingUnderWrites(answers, 99), StreamEndingUnderWrites(answers, 99)
    lane = _Lane(fresh)  # type: ignore[arg-type]
    assert await lane.ioctls(_feature_requests(3)) == answers and lane.answered
    assert await _taken(taken).ioctls(_feature_requests(3)) == answers
    # Its first write failing: it never went out.  An idle lane was stale (a
    # new one is asked); a new lane was refused, why hidden: made unary.
    with pytest.raises(_Stale):
        await _taken(StreamEndingUnderWrites([], fail_at=0)).ioctls(_feature_requests(2))
    with pytest.raises(_Unsent):
        await _Lane(StreamEndingUnderWrites([], fail_at=0)).ioctls(_feature_requests(2))  # type: ignore[arg-type]


class AnsweredBeforeWritten:
    """A stand-in for an Ioctl call on which the answer to a request is read
    before the write that sent it returns: grpc completes a write and
    delivers its answer as two events, in either order.  A write made while
    a read waits returns once its answer was read."""

    def __init__(self, answers: list[pb.IoctlAnswer]) -> None:
        self.answers = answers
        self.written = self.read_count = self.reading = 0
        self.changed = asyncio.Condition()

    def done(self) -> bool:
        return False

    async def write(self, request: pb.IoctlRequest) -> None:
        async with self.changed:
            self.written += 1
            n = self.written
            self.changed.notify_all()
            if self.reading:
                await self.changed.wait_for(lambda: self.read_count >= n)

    async def read(self) -> pb.IoctlAnswer:
        async with self.changed:
            self.reading += 1
            # Past the last answer: nothing more ever comes (a driver idle
            # on the stream, waiting for the next request).
            await self.changed.wait_for(
                lambda: self.read_count < min(self.written, len(self.answers))
            )
            self.reading -= 1
            self.read_count += 1
            self.changed.notify_all()
            return self.answers[self.read_count - 1]

    def cancel(self) -> None:
        pass


@pytest.mark.parametrize("new_lane", [False, True])
async def test_an_answer_read_before_its_write_returned_ends_the_sequence(new_lane: bool) -> None:
    """pending_exact's pair on a lane whose second answer is read before the
    write of the second request has returned: the sequence ends with both
    answers (it once read on for a third answer, for ever: a cross-host
    migration hung in pending_exact about once in 2,000 pairs), and the
    lane stays usable."""
    answers = [
        pb.IoctlAnswer(device_feature=pb.DeviceFeatureResponse(data=bytes([i]))) for i in range(4)
    ]
    call = AnsweredBeforeWritten(answers)
    lane = _Lane(call) if new_lane else _taken(call)  # type: ignore[arg-type]
    got = await asyncio.wait_for(lane.ioctls(_feature_requests(2)), 5)
    assert got == answers[:2] and call.written == 2
    assert await asyncio.wait_for(lane.ioctls(_feature_requests(2)), 5) == answers[2:]


async def test_a_new_lane_whose_first_write_fails_has_the_calls_made_unary() -> None:
    """Nothing reached the driver, and grpc hid why (an old driver's
    UNIMPLEMENTED, the most streams): the unary calls run them and say."""
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        lanes = IoctlLanes(channel, ())
        made: list[int] = []
        lanes._method = lambda metadata: StreamEndingUnderWrites([], fail_at=0)  # type: ignore[assignment,method-assign]

        def unary(i: int) -> Any:
            async def call() -> int:
                made.append(i)
                return i

            return call

        seq = [("DeviceFeature", pb.DeviceFeatureRequest(fd=3), unary(i)) for i in range(3)]
        assert await lanes.sequence(seq) == [0, 1, 2] and made == [0, 1, 2]
        assert lanes.enabled  # why is unknown: lanes are tried again next time


async def _refuse_ioctl(requests: AsyncIterator[pb.IoctlRequest], context: Any) -> Any:
    """An old driver's answer to Ioctl, racing the client's second write."""
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    yield pb.IoctlAnswer()  # pragma: no cover


async def test_a_driver_refusing_the_stream_has_the_sequence_made_unary() -> None:
    """Whether grpc keeps UNIMPLEMENTED or loses it to a failed write, a
    sequence on a driver without Ioctl is answered by the unary calls."""
    async with fake_ioctl_driver(_refuse_ioctl) as target:
        for _ in range(20):
            async with VfioClient(target, tls=None) as c:
                made: list[int] = []

                def unary(i: int, made: list[int] = made) -> Any:
                    async def call() -> int:
                        made.append(i)
                        return i

                    return call

                seq = [("DeviceFeature", pb.DeviceFeatureRequest(fd=3), unary(i)) for i in range(4)]
                assert await c._ioctls.sequence(seq) == [0, 1, 2, 3]
                assert made == [0, 1, 2, 3]


def record_unary(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The RPCs the clients make as unary calls, from now on."""
    made: list[str] = []
    rpc = VfioClient._rpc

    async def recording(self: VfioClient, call: calls.Unary[Any]) -> Any:
        made.append(call.rpc)
        return await rpc(self, call)

    monkeypatch.setattr(VfioClient, "_rpc", recording)
    return made


async def test_close_goes_on_a_lane(
    drv: DriverUnderTest, lib: VfioClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close(2) on a lane: no new call for it (a new call waits behind every
    other client's to be taken up), the same errno as the unary call's."""
    fd = await lib.open_device((await drv.create_vfs())[0].name)
    data_fd = await lib.set_state(fd, MigState.PRE_COPY)
    assert data_fd is not None
    made = record_unary(monkeypatch)
    await lib.close(data_fd)
    with pytest.raises(VfioClientError) as caught:
        await lib.close(data_fd)
    assert caught.value.errno == errno.EBADF
    await lib.close(fd)
    assert made == [] and lib._ioctls.unknown == set()


async def test_a_driver_before_close_on_lanes_gets_the_unary_close(
    drv: DriverUnderTest, lib: VfioClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver that knows no close_fd on its Ioctl stream answers EINVAL
    (operation "ioctl") and closes nothing: the close is made as the unary
    call, and later ones go unary at once."""
    import driver.service.servicer as servicer_module

    answer = servicer_module.answer_ioctl
    seen: list[str | None] = []

    async def before_close_fd(calls_: Any, proc: Any, request: pb.IoctlRequest, *a: Any) -> Any:
        seen.append(request.WhichOneof("ioctl"))
        if request.WhichOneof("ioctl") == "close_fd":
            request = pb.IoctlRequest()  # what an older driver parses out of it
        return await answer(calls_, proc, request, *a)

    monkeypatch.setattr(servicer_module, "answer_ioctl", before_close_fd)
    fd = await lib.open_device((await drv.create_vfs())[0].name)
    data_fd = await lib.set_state(fd, MigState.PRE_COPY)
    assert data_fd is not None
    made = record_unary(monkeypatch)
    await lib.close(data_fd)
    assert made == ["CloseFd"] and lib._ioctls.unknown == {"close_fd"}
    with pytest.raises(VfioClientError) as caught:  # it did close
        await lib.precopy_info(data_fd)
    assert caught.value.errno == errno.EBADF
    await lib.close(fd)
    assert made == ["CloseFd", "CloseFd"]
    assert seen.count("close_fd") == 1  # the second went unary at once
    assert lib._ioctls.enabled  # the other ioctls stay on lanes
