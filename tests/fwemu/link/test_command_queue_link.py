"""GrpcLink's command queue (fwemu/link/cmdqueue.py; issue 16 item 1) against a
real FirmwareServer in the run's mode: many commands in flight across many VFs
get their own answers whatever order they finish in; at most 32 are in flight
and the rest wait for a slot; a broken stream fails what is in flight at once
and the next command opens a new one; a firmware without the queue gets unary
calls; a refusal is a LinkError; every command is counted."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fwemu.api.v1 import firmware_pb2 as fpb
from fwemu.api.v1 import firmware_pb2_grpc as fgrpc
from fwemu.link import cmdqueue
from fwemu.link.base import LinkError
from fwemu.link.cmdqueue import CommandQueue
from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import (
    CmdStatus,
    Fault,
    FaultKind,
    KiB,
    Opcode,
    QueryVhcaMigrationStateIn,
    VfConfig,
)
from fwemu.link.wire import QUEUE_SLOTS
from fwemu.model import Firmware, VirtualClock
from fwemu.service import server as fwserver
from fwemu.service.server import FirmwareServer
from fwemu.service.servicers import FirmwareServicer
from tests.support import tls_mode
from tests.support.harness_link import connect_link
from tests.support.tls import Pki

pytestmark = pytest.mark.grpc

VFS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A firmware of VFS VFs of distinct sizes (so each VF's query answers
    differently), served in the run's mode on a fixed address."""

    def __init__(self) -> None:
        self.address = f"127.0.0.1:{_free_port()}"
        self.fw = Firmware(VirtualClock(), seed=3)
        self.server: FirmwareServer | None = None

    async def start(self) -> None:
        self.fw = Firmware(VirtualClock(), seed=3)
        for k in range(VFS):
            self.fw.create_vfs(1, VfConfig(size=(k + 1) * 64 * KiB, dirty_bytes_per_s=0))
        self.server = FirmwareServer(self.fw, roles=tls_mode.roles())
        await tls_mode.start(self.server, self.address)

    async def stop(self) -> None:
        assert self.server is not None
        tls_mode.stopped(self.address)
        await self.server.stop(0)
        self.server = None


@pytest.fixture(name="served")
async def served_fixture() -> AsyncIterator[Served]:
    s = Served()
    await s.start()
    yield s
    if s.server is not None:
        await s.stop()


@pytest.fixture(name="link")
async def link_fixture(served: Served) -> AsyncIterator[GrpcLink]:
    link = await connect_link(served.address)
    yield link
    await link.close()


def delay_queries(fw: Firmware, vhca_id: int, count: int = 1000) -> None:
    fw.inject_fault(
        vhca_id, Fault(FaultKind.DELAY, Opcode.QUERY_VHCA_MIGRATION_STATE, delay_s=1.0, count=count)
    )


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_many_commands_across_many_vfs_get_their_own_answers(
    served: Served, link: GrpcLink
) -> None:
    """Six queries of each of 16 VFs at once, the odd VFs' delayed: the link
    keeps 32 in flight (the rest wait for a slot, none is refused), answers
    arrive out of order, and each caller gets its own VF's answer."""
    expected = {
        v: served.fw.query_vhca_migration_state(v).required_umem_size for v in served.fw.vfs
    }
    assert len(set(expected.values())) == VFS
    for v in range(1, VFS + 1, 2):
        delay_queries(served.fw, v)
    order: list[int] = []

    async def query(v: int) -> int:
        r = await link.query_vhca_migration_state(v)
        assert r.status == CmdStatus.OK, r
        order.append(v)
        return int(r.required_umem_size)

    calls = [(v, asyncio.ensure_future(query(v))) for _ in range(6) for v in range(1, VFS + 1)]
    # 48 delayed queries: once 32 of them hold every slot, the rest wait.
    await until(lambda: link.queue.in_flight == QUEUE_SLOTS)
    assert sum(not task.done() for _, task in calls) > QUEUE_SLOTS
    peak = link.queue.in_flight
    while not all(task.done() for _, task in calls):
        served.fw.advance_clock(1.0)
        await asyncio.sleep(0.01)
        peak = max(peak, link.queue.in_flight)
    assert peak == QUEUE_SLOTS
    for v, task in calls:
        assert task.result() == expected[v]
    assert order.index(2) < order.index(1)  # an undelayed VF answered before a delayed one
    assert link.commands["QueryVhcaMigrationState", "OK"] == 6 * VFS
    assert link.queue.streams_opened == 1 and not link.queue.unimplemented


async def test_a_broken_stream_fails_what_is_in_flight_and_the_link_recovers(
    served: Served, link: GrpcLink
) -> None:
    """As a unary call failing UNAVAILABLE did: every command in flight fails
    with LinkError at once when the firmware goes; once it is back, the next
    command opens a new stream."""
    delay_queries(served.fw, 1)
    in_flight = [asyncio.ensure_future(link.query_vhca_migration_state(1)) for _ in range(5)]
    await until(lambda: link.queue.in_flight == 5 and served.fw.stats.commands)
    await served.stop()
    done, pending = await asyncio.wait(in_flight, timeout=5)
    assert not pending
    for task in done:
        assert isinstance(task.exception(), LinkError)
    assert link.queue.in_flight == 0
    assert sum(n for (rpc, code), n in link.commands.items() if code != "OK") == 5
    await served.start()
    await until(lambda: link.up)
    r = await asyncio.wait_for(link.query_vhca_migration_state(2), 5)
    assert r.ok
    assert link.queue.streams_opened == 2


async def test_a_firmware_without_the_queue_gets_unary_calls(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A firmware that answers CommandQueue UNIMPLEMENTED (one from before
    it): the commands sent on the queue ran nowhere and go as unary calls,
    and so do all that follow."""

    class OldFirmware(FirmwareServicer):
        CommandQueue = fgrpc.FirmwareServicer.CommandQueue  # type: ignore[assignment]  # UNIMPLEMENTED

    await served.stop()
    monkeypatch.setattr(fwserver, "FirmwareServicer", OldFirmware)
    await served.start()
    link = await connect_link(served.address)
    try:
        results = await asyncio.gather(*(link.query_vhca_migration_state(v) for v in (1, 2, 3)))
        assert all(r.ok for r in results)
        assert link.queue.unimplemented and link.queue.streams_opened == 1
        assert (await link.suspend_vhca(1, op_mod=0)).ok
        assert served.fw.info(1).initiator_suspended
        assert link.queue.streams_opened == 1  # no new stream: unary calls
        assert link.commands["QueryVhcaMigrationState", "OK"] == 3
        assert link.commands["SuspendVhca", "OK"] == 1
    finally:
        await link.close()


async def test_a_command_the_firmware_refuses_is_a_link_error(
    served: Served, link: GrpcLink
) -> None:
    """A link that (wrongly) kept more than 32 in flight: the firmware refuses
    the command past its slots (QUEUE_FULL), and the caller gets LinkError
    naming why; the others answer."""
    link.queue = CommandQueue(link._open_queue, 1 << 40, slots=QUEUE_SLOTS + 1)
    delay_queries(served.fw, 1)
    tasks = [asyncio.ensure_future(link.query_vhca_migration_state(1)) for _ in range(QUEUE_SLOTS)]
    await until(lambda: sum(served.fw.stats.commands.values()) == QUEUE_SLOTS)
    with pytest.raises(LinkError, match="queue is full"):
        await link.query_vhca_migration_state(2)
    assert link.commands["QueryVhcaMigrationState", "RESOURCE_EXHAUSTED"] == 1
    served.fw.advance_clock(1.0)
    for task in tasks:
        assert (await asyncio.wait_for(task, 5)).ok


async def test_a_link_whose_principal_is_no_driver_is_denied(pki: Pki) -> None:
    """Under mutual TLS a tenant's link gets PERMISSION_DENIED on the queue:
    its command fails with LinkError naming the rule, and never ran."""
    fw = Firmware(VirtualClock(), seed=3)
    fw.create_vfs(1, VfConfig(size=64 * KiB, dirty_bytes_per_s=0))
    server = FirmwareServer(fw, roles=pki.roles())
    port = await server.start("127.0.0.1:0", tls_config=pki.server_tls())
    link = GrpcLink(f"127.0.0.1:{port}", tls=pki.client_tls("team-a"))
    try:
        with pytest.raises(LinkError, match="may not use the Firmware service"):
            await link.query_vhca_migration_state(1)
        assert link.commands == {("QueryVhcaMigrationState", "PERMISSION_DENIED"): 1}
        assert not link.queue.unimplemented
        assert not fw.stats.commands
    finally:
        await link.close()
        await server.stop(0)


class FakeCall:
    """A CommandQueue call whose batches the test writes and answers by hand."""

    def __init__(self, requests: AsyncIterator[fpb.CommandQueueRequest]) -> None:
        self.requests = requests
        self.responses: asyncio.Queue[fpb.CommandQueueResponse] = asyncio.Queue()

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> fpb.CommandQueueResponse:
        return await self.responses.get()

    def cancel(self) -> None:
        pass


async def test_a_cancelled_command_not_yet_written_is_withdrawn() -> None:
    """A caller that goes away before its command was written takes it back,
    and its slot; one already written keeps its slot until its answer comes
    (the firmware still holds it), so the link never overfills the firmware."""
    calls: list[FakeCall] = []

    def open_stream(requests: AsyncIterator[fpb.CommandQueueRequest]) -> FakeCall:
        calls.append(FakeCall(requests))
        return calls[-1]

    queue = CommandQueue(open_stream, 1 << 40, slots=2)
    written = asyncio.ensure_future(queue.run(QueryVhcaMigrationStateIn(1)))
    await until(lambda: queue.in_flight == 1)
    (call,) = calls
    (batch,) = [await anext(call.requests)]  # written
    (token,) = [c.token for c in batch.commands]
    withdrawn = asyncio.ensure_future(queue.run(QueryVhcaMigrationStateIn(2)))
    await until(lambda: queue.in_flight == 2)
    withdrawn.cancel()
    written.cancel()
    for task in (withdrawn, written):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert queue.in_flight == 1  # the written one's answer is still due
    third = asyncio.ensure_future(queue.run(QueryVhcaMigrationStateIn(3)))
    (batch,) = [await anext(call.requests)]
    assert [c.query_vhca_migration_state.vhca_id for c in batch.commands] == [3]  # not 2
    answer = fpb.CommandAnswer(token=token)
    answer.query_vhca_migration_state.SetInParent()
    call.responses.put_nowait(fpb.CommandQueueResponse(answers=[answer]))
    await until(lambda: queue.in_flight == 1)
    third.cancel()
    await queue.close()


def _answer(token: int) -> fpb.CommandQueueResponse:
    answer = fpb.CommandAnswer(token=token)
    answer.query_vhca_migration_state.SetInParent()
    return fpb.CommandQueueResponse(answers=[answer])


async def test_commands_posted_while_a_batch_waits_for_its_answer_go_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone command goes at once; those posted while a batch has had no
    answer go together once one comes, or once HOLD_S passed without one (a
    command the firmware delays does not hold the others back longer)."""
    monkeypatch.setattr(cmdqueue, "HOLD_S", 30.0)
    calls: list[FakeCall] = []

    def open_stream(requests: AsyncIterator[fpb.CommandQueueRequest]) -> FakeCall:
        calls.append(FakeCall(requests))
        return calls[-1]

    queue = CommandQueue(open_stream, 1 << 40)
    first = asyncio.ensure_future(queue.run(QueryVhcaMigrationStateIn(1)))
    await until(lambda: queue.in_flight == 1)
    (call,) = calls
    batch = await asyncio.wait_for(anext(call.requests), 1)  # alone: at once
    (token,) = [c.token for c in batch.commands]
    later = [asyncio.ensure_future(queue.run(QueryVhcaMigrationStateIn(v))) for v in (2, 3)]
    await until(lambda: queue.in_flight == 3)
    held = asyncio.ensure_future(anext(call.requests))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not held.done()  # waiting for an answer to the first batch
    monkeypatch.setattr(cmdqueue, "HOLD_S", 0.02)  # for the batches from now on
    call.responses.put_nowait(_answer(token))
    batch = await asyncio.wait_for(held, 1)
    assert [c.query_vhca_migration_state.vhca_id for c in batch.commands] == [2, 3]
    await first
    fourth = asyncio.ensure_future(queue.run(QueryVhcaMigrationStateIn(4)))
    batch = await asyncio.wait_for(anext(call.requests), 1)  # no answer came: after HOLD_S
    assert [c.query_vhca_migration_state.vhca_id for c in batch.commands] == [4]
    for task in (*later, fourth):
        task.cancel()
    await queue.close()
