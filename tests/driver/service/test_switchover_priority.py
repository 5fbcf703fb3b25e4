"""Switchover priority over gRPC, two tenants (driver/priority.py): while a
tenant's device is stopped in STOP_COPY, that tenant's precopy requests
(PRECOPY_INFO, MIG_DATA_SIZE, blocking precopy reads) wait for the switchover to end;
the other tenant's go on at once; a reset or a close of the stopped device
ends its switchover too; the metrics count the waits.  Answers are what they would have been."""

from __future__ import annotations

import asyncio

import pytest

from driver.service.metrics import DriverCollector
from driver.vfio.uapi import VFIO_DEVICE_FEATURE_GET, Feature
from tests.driver.service.tenancy import WORKLOAD, A, B, S, Tenancy
from tests.support.driver_service import eventually

pytestmark = pytest.mark.grpc


async def _waiting(t: Tenancy, n: int) -> bool:
    return t.server.registry.priority.waiting == n


async def test_a_tenants_precopy_waits_for_its_own_switchover_not_for_anothers(
    tenancy: Tenancy,
) -> None:
    t = tenancy
    prio = t.server.registry.priority
    # Past the test's steps: each wait below ends with its switchover, well
    # within both bounds, or the wait_for around it fails.
    prio.max_wait, prio.span = 5.0, 60.0
    stopping, running, theirs = await t.create_vfs(3, **WORKLOAD)
    a, b = await t.client(A), await t.client(B)
    sfd, rfd = await a.open_device(stopping.name), await a.open_device(running.name)
    tfd = await b.open_device(theirs.name)
    pre_a = await a.set_state(rfd, S.PRE_COPY)
    pre_b = await b.set_state(tfd, S.PRE_COPY)
    await a.set_state(sfd, S.STOP_COPY)  # A's VM is stopped: its switchover

    # B's precopy goes on at once.
    info_b = await asyncio.wait_for(b.precopy_info(pre_b), 5.0)
    assert info_b.initial_bytes > 0
    assert await asyncio.wait_for(b.read(pre_b, 4096), 5.0)
    assert prio.deferred == 0

    # A's waits, each kind of request, until the switchover ends.
    data_size = VFIO_DEVICE_FEATURE_GET | Feature.MIG_DATA_SIZE
    requests = (
        lambda: a.precopy_info(pre_a),
        lambda: a.device_feature(rfd, 16, data_size, bytes(8)),
        lambda: a.read(pre_a, 4096),
    )
    for request in requests:
        call = asyncio.ensure_future(request())
        assert await eventually(lambda: _waiting(t, 1))
        await asyncio.sleep(0.05)
        assert not call.done()
        await a.set_state(sfd, S.STOP)  # the destination runs: the switchover is over
        assert await asyncio.wait_for(call, 2.0)
        assert prio.waiting == 0
        await a.set_state(sfd, S.STOP_COPY)  # and the next one
    assert prio.deferred == 3

    # A nonblocking read does not wait: O_NONBLOCK says so.
    await asyncio.wait_for(a.read(pre_a, 4096, nonblock=True), 5.0)
    assert prio.deferred == 3

    # A reset of the stopped device ends its switchover as well.
    call = asyncio.ensure_future(a.precopy_info(pre_a))
    assert await eventually(lambda: _waiting(t, 1))
    await a.reset(sfd)
    info_a = await asyncio.wait_for(call, 2.0)
    assert info_a.initial_bytes > 0  # the 1 MiB image, 8 KiB of it read
    assert prio.deferred == 4 and prio.switching(t.principal(A)) == 0

    # So does a close of the stopped device.
    await a.set_state(sfd, S.STOP_COPY)
    call = asyncio.ensure_future(a.precopy_info(pre_a))
    assert await eventually(lambda: _waiting(t, 1))
    await a.close(sfd)
    await asyncio.wait_for(call, 2.0)
    assert prio.deferred == 5 and prio.switching(t.principal(A)) == 0

    # What the metrics say of it.
    families = {f.name: f for f in DriverCollector(t.server.servicer).collect()}
    assert families["vfio_precopy_deferred"].samples[0].value == 5
    assert families["vfio_precopy_deferred_seconds"].samples[0].value == prio.deferred_s > 0
    assert families["vfio_precopy_waiting"].samples[0].value == 0


async def test_with_the_priority_off_nothing_waits(tenancy: Tenancy) -> None:
    t = tenancy
    prio = t.server.registry.priority
    prio.max_wait = 0.0
    stopping, running = await t.create_vfs(2, **WORKLOAD)
    a = await t.client(A)
    sfd, rfd = await a.open_device(stopping.name), await a.open_device(running.name)
    pre = await a.set_state(rfd, S.PRE_COPY)
    await a.set_state(sfd, S.STOP_COPY)
    await asyncio.wait_for(a.precopy_info(pre), 5.0)
    assert (prio.deferred, prio.switching(t.principal(A))) == (0, 1)
