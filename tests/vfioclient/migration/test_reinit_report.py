"""Every REINIT the driver answers the orchestrator is in the migration
report (issue 18, item 1), the one in the first PRECOPY_INFO right after
PRE_COPY (save_setup) included: the report's REINITs are counted against the
driver's own, its Events stream's PRECOPY_INFO answers with REINIT (and, in
this process, its DeviceStats.reinits, which vfio_precopy_info_total
{reinit="true"} exports).  In this process and against the services as
processes (fwemu + two drivers, and a driver with its firmware embedded).

And `at_first_ack` (the demo's and these tests' reconfiguration at the first
switchover-ack) acts while none of the orchestrator's calls is in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from driver.api.events import PrecopyAnswered, StateChanged
from driver.shards import pci_name
from fwemu.link.ifc import MiB
from tests.support.vfioclient_e2e import Rig, Topology, embedded, rig, three_process
from tests.support.vfioclient_migration import InProcessRig, in_process_rig
from vfioclient import VfioClient
from vfioclient.migration import MigrationOptions, MigrationReport, at_first_ack, migrate
from vfioclient.migration.run import Migration

pytestmark = pytest.mark.grpc

SIZE = 4 * MiB  # one SAVE at PRE_COPY saves all of it: past ARM's saved bytes
ARM = 1 * MiB


@contextlib.asynccontextmanager
async def reinit_answers(client: VfioClient, device: str) -> AsyncIterator[list[int]]:
    """The driver's PRECOPY_INFO answers with REINIT for `device` (their
    initial_bytes), from its Events stream, until the source's STOP_COPY ->
    STOP (the migration's cleanup) has been seen."""
    seen: list[int] = []
    stream = client.events(device)
    await stream.ready()

    async def follow() -> None:
        async for ev in stream:
            if isinstance(ev.payload, PrecopyAnswered) and ev.payload.reinit:
                seen.append(ev.payload.initial_bytes)
            if isinstance(ev.payload, StateChanged) and (
                ev.payload.from_state,
                ev.payload.to_state,
            ) == ("STOP_COPY", "STOP"):
                return

    task = asyncio.create_task(follow())
    try:
        yield seen
        await asyncio.wait_for(task, 15)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stream.aclose()


def check(r: MigrationReport, answers: list[int], device: str) -> None:
    assert r.status == "completed" and r.verified, r.error
    mine = [e for e in r.reinits if e.device == device]
    assert [e.initial_bytes for e in mine] == answers, (r.reinits, answers)
    # One at setup (the armed reconfiguration ran inside the first SAVE), one
    # in precopy (at the first switchover-ack).
    assert [(e.phase, e.handling) for e in mine] == [
        ("setup", "the first ack waits for them"),
        ("precopy", "ack re-armed"),
    ]
    assert mine[0].iteration == 0 and mine[0].precopy_bytes_before == 0
    (dev,) = r.devices
    # The first ack waited for the setup REINIT's initial bytes; the second for
    # the precopy one's.
    assert dev.init_data_sent == 2 and dev.acks == 2
    assert dev.precopy_bytes >= mine[0].initial_bytes


# --- in this process ----------------------------------------------------------------------


@pytest.fixture(name="inproc")
async def inproc_fixture() -> AsyncIterator[InProcessRig]:
    async with in_process_rig() as r:
        yield r


async def test_in_process_every_reinit_answered_is_reported(inproc: InProcessRig) -> None:
    pair, s, d = await inproc.pair(size=SIZE)
    inproc.fw.reconfigure(s, after_saved_bytes=ARM)  # armed: runs inside the first SAVE
    o = inproc.digest_hook([(s, d)])

    async def digests(_: Any) -> tuple[str, str]:
        return inproc.fw.digest(s), inproc.fw.digest(d)

    o.digests = digests

    async def reconfigure() -> None:
        inproc.fw.reconfigure(s)

    at_first_ack(o, pair.name, reconfigure)
    device = pci_name(s)
    mvdev = inproc.server.registry.devices[device].mvdev
    before = mvdev.stats.reinits
    async with reinit_answers(inproc.dst, device) as answers:
        r = await migrate([pair], o)
    check(r, answers, pair.name)
    assert mvdev.stats.reinits - before == len(answers) == 2


# --- the services as processes -------------------------------------------------------------


@pytest.fixture(name="topology", scope="module", params=["three-process", "embedded"])
def topology_fixture(request: pytest.FixtureRequest) -> Iterator[Topology]:
    with (three_process if request.param == "three-process" else embedded)() as t:
        yield t


@pytest.fixture(name="procs")
async def procs_fixture(topology: Topology) -> AsyncIterator[Rig]:
    async with rig(topology) as r:
        yield r


async def test_over_grpc_every_reinit_answered_is_reported(procs: Rig) -> None:
    (p,) = await procs.pairs(1, size=SIZE)
    await procs.scenario.reconfigure(p.src_vhca, after_saved_bytes=ARM)
    o = procs.digest_hook([p])

    async def digests(_: Any) -> tuple[str, str]:
        return await procs.scenario.digest(p.src_vhca), await procs.scenario.digest(p.dst_vhca)

    o.digests = digests

    async def reconfigure() -> None:
        await procs.scenario.reconfigure(p.src_vhca)

    at_first_ack(o, p.pair.name, reconfigure)
    infos = {v.vhca_id: v for v in await procs.scenario.list_vfs()}
    device = pci_name(infos[p.src_vhca].function_id)
    async with reinit_answers(procs.src, device) as answers:
        r = await migrate([p.pair], o)
    check(r, answers, p.pair.name)


# --- at_first_ack -------------------------------------------------------------------------


def count_in_flight(client: VfioClient, names: list[str]) -> Callable[[], int]:
    """Wrap the client's `names` calls; a function giving how many are in flight."""
    in_flight = [0]

    def wrap(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counted(*a: Any, **kw: Any) -> Any:
            in_flight[0] += 1
            try:
                return await call(*a, **kw)
            finally:
                in_flight[0] -= 1

        return counted

    for name in names:
        setattr(client, name, wrap(getattr(client, name)))
    return lambda: in_flight[0]


async def test_at_first_ack_acts_between_iterations_and_holds_the_ack(
    inproc: InProcessRig,
) -> None:
    """The action runs once, with no PRECOPY_INFO, MIG_DATA_SIZE or read of
    the source in flight, after the first ack was asked for and before it
    counted; the REINIT it causes is then answered and reported."""
    pair, s, _ = await inproc.pair(size=SIZE)
    o = MigrationOptions(bandwidth_estimate=100 << 20, iteration_interval_s=0.002)
    in_flight = count_in_flight(
        inproc.src, ["precopy_info", "data_size", "read", "read_into", "get_state"]
    )
    seen: list[tuple[int, int]] = []

    async def reconfigure() -> None:
        (dev,) = r_devices
        seen.append((in_flight(), dev.acks))
        inproc.fw.reconfigure(s)

    m = Migration([pair], o)
    r_devices = m.report.devices
    first = at_first_ack(o, pair.name, reconfigure)
    r = await m.run()
    assert first.done and first.iteration >= 1
    assert seen == [(0, 0)]  # nothing in flight; the first ack not counted yet
    (ev,) = r.reinits
    assert ev.phase == "precopy" and ev.iteration >= first.iteration
    assert r.devices[0].acks == 2
