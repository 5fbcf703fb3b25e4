"""grpcsvc.looplag: a loop that is held up shows in the lag histogram and its
maximum; the watcher runs from a GrpcService's start to its stop; and both
services export it across real gRPC servers."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from grpcsvc.looplag import LAG, LAG_MAX, LoopLag
from grpcsvc.server import GrpcService
from tests.support.exposition import value
from tests.support.scrape import firmware_and_driver


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    v = registry.get_sample_value(name, labels)
    assert v is not None, f"{name}{labels} is not exported"
    return v


async def test_a_loop_held_up_shows_in_the_histogram_and_the_maximum() -> None:
    registry = CollectorRegistry()
    lag = LoopLag(registry, interval_s=0.01)
    lag.start()
    await asyncio.sleep(0.05)  # some timers on an idle loop
    time.sleep(0.3)  # a synchronous step: nothing else runs meanwhile
    await asyncio.sleep(0.05)
    await lag.stop()
    count = _sample(registry, f"{LAG}_count")
    assert count >= 3
    late = count - _sample(registry, f"{LAG}_bucket", le="0.25")
    assert late >= 1, "the 0.3 s hold-up is not above the 0.25 s bucket"
    assert 0.25 < _sample(registry, LAG_MAX) < 5
    assert _sample(registry, f"{LAG}_sum") >= 0.25


async def test_the_maximum_only_grows_and_a_negative_lag_counts_as_none() -> None:
    registry = CollectorRegistry()
    lag = LoopLag(registry)
    for s in (0.02, 0.5, 0.1, -0.001):
        lag.observe(s)
    assert _sample(registry, LAG_MAX) == 0.5
    assert _sample(registry, f"{LAG}_bucket", le="0.001") == 1  # the negative one, as 0
    assert _sample(registry, f"{LAG}_count") == 4


async def test_stopped_it_observes_nothing_more() -> None:
    registry = CollectorRegistry()
    lag = LoopLag(registry, interval_s=0.005)
    lag.start()
    lag.start()  # a second start keeps the one watcher
    await asyncio.sleep(0.05)
    await lag.stop()
    count = _sample(registry, f"{LAG}_count")
    assert count >= 1
    await asyncio.sleep(0.05)
    assert _sample(registry, f"{LAG}_count") == count
    await lag.stop()  # stopping twice is harmless


def test_the_interval_must_be_positive() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            LoopLag(CollectorRegistry(), interval_s=bad)


async def test_a_service_measures_its_loop_from_start_to_stop() -> None:
    registry = CollectorRegistry()
    lag = LoopLag(registry, interval_s=0.005)
    service = GrpcService([], lambda server: None, loop_lag=lag)
    await asyncio.sleep(0.03)
    assert _sample(registry, f"{LAG}_count") == 0  # not before start
    await service.start("127.0.0.1:0")
    await asyncio.sleep(0.05)
    await service.stop(0)
    count = _sample(registry, f"{LAG}_count")
    assert count >= 1
    await asyncio.sleep(0.03)
    assert _sample(registry, f"{LAG}_count") == count


@pytest.mark.grpc
async def test_both_services_export_their_loops_lag() -> None:
    with firmware_and_driver() as (fw, drv):
        for served in (fw, drv):
            text = await served.ascrape()
            deadline = time.monotonic() + 10
            while value(text, f"{LAG}_count") == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                text = await served.ascrape()
            assert value(text, f"{LAG}_count") >= 1
            assert value(text, f"{LAG}_bucket", le="+Inf") == value(text, f"{LAG}_count")
            assert f"# TYPE {LAG_MAX} gauge" in text
