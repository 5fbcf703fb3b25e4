"""Events subscribers are bounded and cheap to others (issue 11, item 4):
publishing touches only the subscribers of the event's device and the
unfiltered ones, whatever watches other devices; subscribers are capped per
client (EMFILE) and in all (ENFILE), with ErrorInfo over gRPC."""

from __future__ import annotations

import errno

import grpc
import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.events import MAX_SUBSCRIBERS, MAX_SUBSCRIBERS_PER_CLIENT, EventBus, SaveCompleted
from driver.service.servicer import EVENTS_KEY
from grpcsvc.errors import error_info
from tests.support.driver_service import DriverUnderTest, VfioClient
from tests.support.vfio_fakes import raises_errno

pytestmark = pytest.mark.grpc


def test_publish_touches_only_that_devices_and_unfiltered_subscribers() -> None:
    """1,000 subscribers of other devices cost a publish nothing: it offers
    the event to the one subscriber of its device and the one of all."""
    bus = EventBus()
    others = [bus.subscribe(f"dev{i}", client=f"c{i}") for i in range(1000)]
    mine = bus.subscribe("a", client="me")
    everything = bus.subscribe(None, client="me")
    bus.publish("a", SaveCompleted(1))
    assert bus.offered == 2
    assert mine.pending == 1 and everything.pending == 1
    assert all(s.pending == 0 for s in others)
    bus.publish("dev7", SaveCompleted(2))
    assert bus.offered == 4 and others[7].pending == 1


def test_subscribers_are_capped_per_client_and_in_all() -> None:
    assert (MAX_SUBSCRIBERS_PER_CLIENT, MAX_SUBSCRIBERS) == (16, 1024)
    bus = EventBus(max_per_client=2, max_subscribers=3)
    a1 = bus.subscribe(client="a")
    bus.subscribe("x", client="a")
    with raises_errno(errno.EMFILE):
        bus.subscribe(client="a")
    bus.subscribe(client="b")
    with raises_errno(errno.ENFILE):
        bus.subscribe(client="c")
    a1.close()  # a closed one frees its places
    bus.subscribe(client="a")
    assert len(bus.subscribers) == 3
    for s in list(bus.subscribers):
        s.close()
    assert bus.subscribers == [] and bus.offered == 0
    bus.publish("x", SaveCompleted(1))
    assert bus.published == 0


async def test_events_past_the_clients_cap_is_emfile_with_error_info(
    drv: DriverUnderTest,
) -> None:
    """Over gRPC: a client's third Events stream (cap 2) fails EMFILE
    (RESOURCE_EXHAUSTED, ErrorInfo); another client still subscribes."""
    drv.server.registry.events.max_per_client = 2
    async with (
        await VfioClient.connect(drv.target, "greedy") as c,
        await VfioClient.connect(drv.target, "other") as other,
    ):
        streams = []
        for _ in range(2):
            call = c.stub.Events(pb.EventsRequest(), metadata=c.metadata)
            assert (EVENTS_KEY, "subscribed") in tuple(await call.initial_metadata())
            streams.append(call)
        refused = c.stub.Events(pb.EventsRequest(), metadata=c.metadata)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await refused.read()
        info = error_info(e.value)
        assert info.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.reason == "EMFILE" and info.metadata["errno"] == str(errno.EMFILE)
        ok = other.stub.Events(pb.EventsRequest(), metadata=other.metadata)
        assert (EVENTS_KEY, "subscribed") in tuple(await ok.initial_metadata())
        for call in (*streams, ok):
            call.cancel()
