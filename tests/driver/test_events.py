"""Driver events (driver/events.py, the Events RPC, VfioClient.events): every
kind over real gRPC, device filtering, a slow subscriber, the end of the
stream when the server stops, and the counters kept for metrics.

Like QEMU's VFIO_MIGRATION events, each names the device; events of a call
name its client (`x-vfio-client`) and, where a data stream is concerned, its
number and the caller's data fd."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driver.events import (
    Dropped,
    ErrorAnswered,
    Event,
    EventBus,
    PrecopyAnswered,
    SaveCompleted,
    SaveFailed,
    StateChanged,
)
from driver.vfio.uapi import VFIO_DEVICE_FEATURE_GET, VFIO_PRECOPY_INFO_REINIT, MigState
from fwemu.link.ifc import CmdStatus, Fault, FaultKind, Opcode
from fwemu.link.inproc import InProcessLink
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from tests.support.driver_service import (
    DriverUnderTest,
    Vf,
    opened,
)
from vfioclient import VfioClient, VfioClientError
from vfioclient.client import EventStream

pytestmark = pytest.mark.grpc

BAD_SYS_STATE = CmdStatus.BAD_SYS_STATE_ERR

S = MigState


@dataclass
class Watch:
    """A client of the driver, and a subscriber following it."""

    drv: DriverUnderTest
    client: VfioClient  # x-vfio-client "orch"
    monitor: VfioClient

    async def follow(self, device: str | None = None) -> EventStream:
        stream = self.monitor.events(device)
        await stream.ready()
        return stream

    async def in_precopy(self) -> tuple[Vf, int, int]:
        """A new VF, opened, in PRE_COPY: its device fd and saving data fd."""
        (vf,) = await self.drv.create_vfs()
        fd = await self.client.open_device(vf.name)
        return vf, fd, await opened(self.client, fd, S.PRE_COPY)

    async def reconfigured_v2_and_v1(self) -> list[tuple[Vf, int]]:
        """Two VFs in PRE_COPY, the first opted in to MIG_PRECOPY_INFOv2,
        both reconfigured: each with its saving data fd."""
        out = []
        for v2, vf in zip((True, False), await self.drv.create_vfs(2), strict=True):
            fd = await self.client.open_device(vf.name)
            if v2:
                assert await self.client.enable_precopy_info_v2(fd)
            out.append((vf, await opened(self.client, fd, S.PRE_COPY)))
            await self.drv.link.reconfigure(vf.vhca_id)
        return out


@pytest.fixture(name="watch")
async def watch_fixture(inproc: DriverUnderTest) -> AsyncIterator[Watch]:
    client = await VfioClient.connect(inproc.target, client_id="orch")
    monitor = await VfioClient.connect(inproc.target, client_id="monitor")
    yield Watch(inproc, client, monitor)
    await client.aclose()
    await monitor.aclose()


async def until(
    stream: AsyncIterator[Event], done: Callable[[Event], bool], timeout: float = 5.0
) -> list[Event]:
    """Events up to and including the first `done` one."""

    async def collect() -> list[Event]:
        got = []
        async for ev in stream:
            got.append(ev)
            if done(ev):
                return got
        raise AssertionError(f"the stream ended first: {got}")

    return await asyncio.wait_for(collect(), timeout)


def of(events: list[Event], kind: type) -> list[Event]:
    return [e for e in events if isinstance(e.payload, kind)]


async def test_state_changes_and_precopy_answers_name_client_device_and_stream(
    watch: Watch,
) -> None:
    (vf,) = await watch.drv.create_vfs()
    stream = await watch.follow()
    c = watch.client
    fd = await c.open_device(vf.name)
    assert await c.enable_precopy_info_v2(fd)
    data_fd = await opened(c, fd, S.PRE_COPY)
    info = await c.precopy_info(data_fd)
    got = await until(stream, lambda e: isinstance(e.payload, PrecopyAnswered))

    (change,) = of(got, StateChanged)
    assert change.payload == StateChanged("RUNNING", "PRE_COPY")
    assert (change.device, change.client) == (vf.name, "orch")
    assert change.stream > 0  # the saving stream the arc opened
    answer = got[-1]
    assert answer.payload == PrecopyAnswered(
        info.initial_bytes, info.dirty_bytes, info.flags, version=2, reinit=False
    )
    assert (answer.device, answer.client, answer.data_fd) == (vf.name, "orch", data_fd)
    assert answer.stream == change.stream
    assert answer.time >= change.time > 0

    await c.set_state(fd, S.RUNNING)  # PRE_COPY -> RUNNING ends the stream
    back = (await until(stream, lambda e: isinstance(e.payload, StateChanged)))[-1]
    assert back.payload == StateChanged("PRE_COPY", "RUNNING")
    assert (back.stream, back.data_fd) == (change.stream, data_fd)


async def test_a_set_walking_several_arcs_gives_one_event_per_arc(watch: Watch) -> None:
    (vf,) = await watch.drv.create_vfs()
    stream = await watch.follow(vf.name)
    fd = await watch.client.open_device(vf.name)
    await watch.client.set_state(fd, S.STOP_COPY)
    got = await until(stream, lambda e: getattr(e.payload, "to_state", "") == "STOP_COPY")
    arcs = [(e.payload.from_state, e.payload.to_state) for e in of(got, StateChanged)]
    assert arcs == [("RUNNING", "RUNNING_P2P"), ("RUNNING_P2P", "STOP"), ("STOP", "STOP_COPY")]


async def test_reinit_and_v1_answers_are_told_apart(watch: Watch) -> None:
    stream = await watch.follow()
    (v2, data2), (v1, data1) = await watch.reconfigured_v2_and_v1()
    c = watch.client
    info = await c.precopy_info(data2)
    assert info.reinit
    await c.precopy_info(data1)
    got = await until(
        stream, lambda e: isinstance(e.payload, PrecopyAnswered) and e.device == v1.name
    )
    reinit, plain = of(got, PrecopyAnswered)
    assert reinit.device == v2.name
    assert reinit.payload == PrecopyAnswered(
        info.initial_bytes, 0, VFIO_PRECOPY_INFO_REINIT, version=2, reinit=True
    )
    assert plain.payload.version == 1 and not plain.payload.reinit


async def test_save_completions_and_failures(watch: Watch) -> None:
    ok, bad = await watch.drv.create_vfs(2)
    stream = await watch.follow()
    c = watch.client
    fault = Fault(FaultKind.FAIL, Opcode.SAVE_VHCA_STATE, BAD_SYS_STATE, in_completion=True)
    await watch.drv.link.inject_fault(bad.vhca_id, fault)
    for vf in (ok, bad):
        await c.set_state(await c.open_device(vf.name), S.PRE_COPY)
    got = await until(stream, lambda e: isinstance(e.payload, SaveFailed))
    done = [e for e in of(got, SaveCompleted) if e.device == ok.name]
    assert done and done[0].payload.image_bytes > 0 and done[0].stream > 0
    failed = got[-1]
    assert failed.device == bad.name
    assert failed.payload == SaveFailed(BAD_SYS_STATE)


async def test_errno_answers_say_errno_operation_and_message(watch: Watch) -> None:
    stream = await watch.follow()
    vf, fd, data_fd = await watch.in_precopy()
    c = watch.client
    calls = [
        (lambda: c.read(fd, 16), "read", errno.EINVAL),  # a device fd
        (lambda: c.precopy_info(fd), "precopy_info", errno.ENOTTY),
        (lambda: c.write(data_fd, b"x"), "write", errno.EBADF),  # a saving fd
        (
            lambda: c.device_feature(fd, 99 | VFIO_DEVICE_FEATURE_GET),
            "device_feature",
            errno.ENOTTY,
        ),
        (lambda: c.set_state(fd, S.STOP_COPY), "set_state", 0),  # fine
        (lambda: c.set_state(fd, S.PRE_COPY), "set_state", errno.EINVAL),  # no such arc
        (lambda: c.close(99), "close", errno.EBADF),
    ]
    want = []
    for call, op, code in calls:
        try:
            await call()
        except VfioClientError as e:
            assert e.errno == code, op
            want.append((op, e.errno, e.name))
        else:
            assert code == 0, op
    got = await until(stream, lambda e: getattr(e.payload, "operation", "") == "close")
    errors = of(got, ErrorAnswered)
    assert [(e.payload.operation, e.payload.errno, e.payload.errno_name) for e in errors] == want
    assert all(e.client == "orch" and e.payload.message for e in errors)
    assert [e.device for e in errors] == [vf.name] * 5 + [""]  # fd 99 names no device
    counts = watch.drv.server.servicer.errors_by_errno
    assert counts == {"EINVAL": 2, "ENOTTY": 2, "EBADF": 2}


async def test_reading_precopy_to_its_end_gives_enomsg_events_and_counts(watch: Watch) -> None:
    stream = await watch.follow()
    vf, _, data_fd = await watch.in_precopy()
    c = watch.client
    with pytest.raises(VfioClientError) as e:
        async for _ in c.read_stream(data_fd):
            pass
    assert e.value.errno == errno.ENOMSG
    (err,) = of(await until(stream, lambda e: isinstance(e.payload, ErrorAnswered)), ErrorAnswered)
    assert err.payload.errno_name == "ENOMSG" and err.payload.operation == "read"
    assert err.data_fd == data_fd and err.stream > 0
    stats = watch.drv.registered(vf).mvdev.stats
    assert stats.read_enomsg == 1
    assert watch.drv.server.servicer.errors_by_errno["ENOMSG"] == 1


async def test_precopy_answers_are_counted_by_version(watch: Watch) -> None:
    (v2, data2), (v1, data1) = await watch.reconfigured_v2_and_v1()
    c = watch.client
    for _ in range(3):
        await c.precopy_info(data2)
        await c.precopy_info(data1)
    s2, s1 = (watch.drv.registered(v).mvdev.stats for v in (v2, v1))
    assert (s2.precopy_info, s2.precopy_info_v2, s2.precopy_info_v1, s2.reinits) == (3, 3, 0, 1)
    assert (s1.precopy_info, s1.precopy_info_v2, s1.precopy_info_v1, s1.reinits) == (3, 0, 3, 0)


async def test_a_device_filter_sees_only_its_device(watch: Watch) -> None:
    one, two = await watch.drv.create_vfs(2)
    only_one = await watch.follow(one.name)
    every = await watch.follow()
    c = watch.client
    await c.set_state(await c.open_device(two.name), S.STOP)
    await c.set_state(await c.open_device(one.name), S.STOP)
    stop = lambda e: getattr(e.payload, "to_state", "") == "STOP"  # noqa: E731
    seen = await until(only_one, lambda e: stop(e) and e.device == one.name)
    assert {e.device for e in seen} == {one.name}
    seen_all = await until(every, lambda e: stop(e) and e.device == one.name)
    assert {e.device for e in seen_all} == {one.name, two.name}


async def test_an_unknown_device_filter_is_enoent(watch: Watch) -> None:
    with pytest.raises(VfioClientError) as e:
        await watch.follow("0000:81:0f.7")
    assert e.value.errno == errno.ENOENT


async def test_a_slow_subscriber_loses_the_oldest_and_gets_a_drop_marker(watch: Watch) -> None:
    """The bus never waits: a burst beyond a subscriber's queue drops the
    oldest events, and the subscriber is told how many first."""
    (vf,) = await watch.drv.create_vfs()
    bus = watch.drv.server.registry.events
    bus.queue_size = 4
    stream = await watch.follow()
    for i in range(50):  # one burst: the service's sender cannot run in between
        bus.publish(vf.name, SaveCompleted(i))
    first = await until(stream, lambda e: True)
    assert first[0].payload == Dropped(46)
    rest = await until(stream, lambda e: getattr(e.payload, "image_bytes", 0) == 49)
    assert [e.payload for e in rest] == [SaveCompleted(i) for i in range(46, 50)]
    assert bus.dropped == 46


async def test_a_subscriber_that_never_reads_does_not_slow_the_driver(watch: Watch) -> None:
    (vf,) = await watch.drv.create_vfs()
    c = watch.client
    with watch.drv.server.registry.events.subscribe(maxsize=2) as sub:  # read only at the end
        fd = await c.open_device(vf.name)
        await asyncio.wait_for(opened(c, fd, S.STOP_COPY), 5)
        for _ in range(20):
            with pytest.raises(VfioClientError):
                await asyncio.wait_for(c.read(fd, 1), 5)  # EINVAL: a device fd
        assert sub.dropped > 0
        marker = await sub.get()
        assert marker is not None and marker.payload == Dropped(sub.dropped)
    assert sub.closed and sub not in watch.drv.server.registry.events.subscribers


async def test_events_end_when_the_server_stops() -> None:
    drv = await DriverUnderTest.start(InProcessLink(Firmware(LoopClock(), seed=3)), "inproc")
    try:
        (vf,) = await drv.create_vfs()
        async with await VfioClient.connect(drv.target) as c:
            stream = c.events()
            await stream.ready()
            await c.set_state(await c.open_device(vf.name), S.STOP)

            async def drain() -> list[Event]:
                return [ev async for ev in stream]

            reader = asyncio.ensure_future(drain())
            await asyncio.sleep(0.05)
            await drv.server.stop(1.0)
            got = await asyncio.wait_for(reader, 5)  # ends OK, not with an error
            assert [e.payload for e in of(got, StateChanged)][-1] == StateChanged(
                "RUNNING_P2P", "STOP"
            )
    finally:
        await drv.stop()


async def test_events_over_a_separate_firmware_process(drv: DriverUnderTest) -> None:
    """SAVE completions come from the firmware link's completion stream here."""
    (vf,) = await drv.create_vfs()
    async with await VfioClient.connect(drv.target, client_id="orch") as c:
        stream = c.events(vf.name)
        await stream.ready()
        fd = await c.open_device(vf.name)
        await c.set_state(fd, S.STOP_COPY)
        got = await until(stream, lambda e: isinstance(e.payload, SaveCompleted))
        assert got[-1].payload.image_bytes > 0 and got[-1].device == vf.name
        await stream.aclose()


# --- the bus alone -------------------------------------------------------------------


def test_publishing_without_subscribers_does_nothing() -> None:
    bus = EventBus()
    bus.publish("0000:81:00.1", SaveCompleted(1))
    assert bus.published == 0 and bus.dropped == 0


async def test_closing_a_subscription_ends_it_after_what_is_queued() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish("a", SaveCompleted(1))
    sub.close()
    bus.publish("a", SaveCompleted(2))  # not subscribed any more
    assert [e.payload async for e in sub] == [SaveCompleted(1)]
    assert bus.subscribers == []


@settings(max_examples=200, deadline=None)
@given(
    maxsize=st.integers(1, 6),
    device=st.sampled_from([None, "a"]),
    ops=st.lists(st.sampled_from(["a", "b", "get"]), max_size=60),
)
def test_a_subscriber_gets_its_events_in_order_and_counts_every_loss(
    maxsize: int, device: str | None, ops: list[str]
) -> None:
    """Whatever the interleaving: what a subscriber receives is its devices'
    events in publishing order, and received + dropped (as the markers say)
    = published for it."""

    async def run() -> None:
        bus = EventBus(queue_size=maxsize)
        sub = bus.subscribe(device)
        published: list[int] = []
        received: list[int] = []
        dropped = 0

        async def take() -> None:
            nonlocal dropped
            ev = await sub.get()
            assert ev is not None
            if isinstance(ev.payload, Dropped):
                dropped += ev.payload.count
            else:
                assert isinstance(ev.payload, SaveCompleted)
                received.append(ev.payload.image_bytes)

        for i, op in enumerate(ops):
            if op == "get":
                if sub.pending:
                    await take()
                continue
            bus.publish(op, SaveCompleted(i))
            if device in (None, op):
                published.append(i)
        sub.close()
        while sub.pending:
            await take()
        assert received == [i for i in published if i in set(received)]
        assert len(received) + dropped == len(published) and dropped == sub.dropped

    asyncio.run(run())
