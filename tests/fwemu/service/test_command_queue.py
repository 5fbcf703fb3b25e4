"""The Firmware service's CommandQueue stream (firmware.proto; issue 16 item 1)
against a real FirmwareServer in the run's mode (plaintext, or mutual TLS
with the driver's certificate): every command answers as its unary RPC does,
answers are matched by token and go back as they finish, and the bounds hold
(32 in flight, duplicate tokens, unknown commands, oversized batches) without
one client's misbehaviour reaching another's stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import pytest

from fwemu.api.v1 import firmware_pb2 as fpb
from fwemu.api.v1 import firmware_pb2_grpc as fgrpc
from fwemu.link.ifc import (
    CapType,
    CmdStatus,
    Fault,
    FaultKind,
    Opcode,
    ResumeOpMod,
    SaveCompletion,
    SuspendOpMod,
    VfConfig,
)
from fwemu.link.wire import QUEUE_SLOTS, QUEUED, RPCS
from fwemu.model import Firmware, VirtualClock
from fwemu.service.cmdqueue import CommandQueueStream
from fwemu.service.server import FirmwareServer
from grpcsvc.errors import error_info
from grpcsvc.tls import aio_channel
from tests.support import tls_mode
from tests.support.tls import DRIVER

pytestmark = pytest.mark.grpc

VF = VfConfig(size=64 * 1024, dirty_bytes_per_s=0)
BAD_MKEY = 0xDEAD00


@dataclass
class World:
    """A firmware served in the run's mode, and the driver's stub to it."""

    fw: Firmware
    server: FirmwareServer
    target: str
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def stub(self) -> Any:  # the aio stub (the generated types are the sync API's)
        ch = aio_channel(self.target, tls_mode.client_tls(self.target, DRIVER))
        self.channels.append(ch)
        return fgrpc.FirmwareStub(ch)

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close(None)
        tls_mode.stopped(self.target)
        await self.server.stop(0)


async def serve(seed: int = 5, vfs: int = 2) -> World:
    fw = Firmware(VirtualClock(), seed=seed)
    fw.create_vfs(vfs, VF)
    server = FirmwareServer(fw, roles=tls_mode.roles())
    return World(fw, server, await tls_mode.start(server))


@pytest.fixture(name="world")
async def world_fixture() -> AsyncIterator[World]:
    w = await serve()
    yield w
    await w.close()


def command(token: int, **request: Any) -> fpb.QueuedCommand:
    (name, msg), *_ = request.items()
    return fpb.QueuedCommand(token=token, **{name: msg})


def query(token: int, vhca_id: int = 1) -> fpb.QueuedCommand:
    return command(
        token, query_vhca_migration_state=fpb.QueryVhcaMigrationStateRequest(vhca_id=vhca_id)
    )


async def post(call: Any, *commands: fpb.QueuedCommand) -> None:
    await call.write(fpb.CommandQueueRequest(commands=list(commands)))


async def answers(call: Any, count: int) -> list[fpb.CommandAnswer]:
    """The next `count` answers, however they are batched."""
    out: list[fpb.CommandAnswer] = []
    while len(out) < count:
        response = await asyncio.wait_for(call.read(), 5)
        assert isinstance(response, fpb.CommandQueueResponse), f"the stream ended: {len(out)}"
        out.extend(response.answers)
    assert len(out) == count
    return out


def delay_queries(fw: Firmware, vhca_id: int, count: int, seconds: float = 1.0) -> None:
    fw.inject_fault(
        vhca_id,
        Fault(FaultKind.DELAY, Opcode.QUERY_VHCA_MIGRATION_STATE, delay_s=seconds, count=count),
    )


# --- the same answers as the unary RPCs -------------------------------------------------

# Each step: the command's field and its request, built from what the world
# learnt so far (its mkey, the last page tracker's object id, the image saved).
Step = tuple[str, Callable[[dict[str, int]], Any]]

_RANGE = fpb.PageTrackRange(start_address=0, length=1 << 20)
STEPS: list[Step] = [
    ("query_hca_cap", lambda w: fpb.QueryHcaCapRequest(op_mod=1, other_function=True,
                                                        function_id=1)),
    ("query_hca_cap", lambda w: fpb.QueryHcaCapRequest(
        op_mod=(CapType.GENERAL_DEVICE_2 << 1) | 1, other_function=True, function_id=2)),
    ("query_hca_cap", lambda w: fpb.QueryHcaCapRequest(op_mod=1, other_function=True,
                                                        function_id=99)),  # no such function
    # the first query of VF 1 meets the FAIL fault injected (Driver.prepare)
    ("query_vhca_migration_state", lambda w: fpb.QueryVhcaMigrationStateRequest(vhca_id=1)),
    ("query_vhca_migration_state", lambda w: fpb.QueryVhcaMigrationStateRequest(vhca_id=99)),
    ("query_vhca_migration_state", lambda w: fpb.QueryVhcaMigrationStateRequest(vhca_id=1,
                                                                                 op_mod=1)),
    ("create_page_tracker", lambda w: fpb.CreatePageTrackerRequest(
        vhca_id=1, log_page_size=12, ranges=[_RANGE])),
    ("report_page_tracker", lambda w: fpb.ReportPageTrackerRequest(
        vhca_id=1, obj_id=w["obj_id"], range_start_address=0, length=1 << 20)),
    ("destroy_page_tracker", lambda w: fpb.DestroyPageTrackerRequest(vhca_id=1,
                                                                      obj_id=w["obj_id"])),
    ("destroy_page_tracker", lambda w: fpb.DestroyPageTrackerRequest(vhca_id=1, obj_id=999)),
    ("suspend_vhca", lambda w: fpb.SuspendVhcaRequest(vhca_id=1,
                                                       op_mod=SuspendOpMod.SUSPEND_INITIATOR)),
    ("suspend_vhca", lambda w: fpb.SuspendVhcaRequest(vhca_id=1,
                                                       op_mod=SuspendOpMod.SUSPEND_RESPONDER)),
    ("suspend_vhca", lambda w: fpb.SuspendVhcaRequest(vhca_id=1, op_mod=7)),  # bad op_mod
    ("save_vhca_state", lambda w: fpb.SaveVhcaStateRequest(
        vhca_id=1, mkey=w["mkey"], size=w["size"], token=77)),
    ("save_vhca_state", lambda w: fpb.SaveVhcaStateRequest(
        vhca_id=1, mkey=BAD_MKEY, size=4096, token=78)),  # not an mkey of this caller
    ("suspend_vhca", lambda w: fpb.SuspendVhcaRequest(vhca_id=2,
                                                       op_mod=SuspendOpMod.SUSPEND_INITIATOR)),
    ("suspend_vhca", lambda w: fpb.SuspendVhcaRequest(vhca_id=2,
                                                       op_mod=SuspendOpMod.SUSPEND_RESPONDER)),
    ("load_vhca_state", lambda w: fpb.LoadVhcaStateRequest(
        vhca_id=2, mkey=w["mkey"], size=w["image"])),
    ("load_vhca_state", lambda w: fpb.LoadVhcaStateRequest(vhca_id=2, mkey=BAD_MKEY,
                                                            size=4096)),
    ("resume_vhca", lambda w: fpb.ResumeVhcaRequest(vhca_id=1,
                                                     op_mod=ResumeOpMod.RESUME_RESPONDER)),
    ("resume_vhca", lambda w: fpb.ResumeVhcaRequest(vhca_id=1,
                                                     op_mod=ResumeOpMod.RESUME_INITIATOR)),
    ("function_level_reset", lambda w: fpb.FunctionLevelResetRequest(vhca_id=2)),
    ("function_level_reset", lambda w: fpb.FunctionLevelResetRequest(vhca_id=99)),
    ("query_vhca_migration_state", lambda w: fpb.QueryVhcaMigrationStateRequest(vhca_id=1)),
]  # fmt: skip
UNARY = {rpc.queued: rpc.name for rpc in RPCS.values()}


class Driver:
    """One world driven through its unary RPCs or its command queue."""

    def __init__(self, world: World, queued: bool) -> None:
        self.world = world
        self.stub = world.stub()
        self.queued = queued
        self.call: Any = self.stub.CommandQueue() if queued else None
        self.learnt: dict[str, int] = {}
        self.completions: list[SaveCompletion] = []
        world.fw.subscribe(self.completions.append)

    async def prepare(self) -> None:
        r = await self.stub.CreateMkey(fpb.CreateMkeyRequest(length=1 << 20, remote=True))
        assert r.status == CmdStatus.OK, r
        self.learnt.update(mkey=r.mkey, size=1 << 20)
        self.world.fw.inject_fault(
            1,
            Fault(FaultKind.FAIL, Opcode.QUERY_VHCA_MIGRATION_STATE, CmdStatus.BAD_RES_STATE_ERR),
        )

    async def run(self, token: int, name: str, request: Any) -> Any:
        if self.queued:
            await post(self.call, command(token, **{name: request}))
            (a,) = await answers(self.call, 1)
            assert a.token == token and a.WhichOneof("answer") == name, a
            response = getattr(a, name)
        else:
            response = await getattr(self.stub, UNARY[name])(request)
        if name == "create_page_tracker":
            self.learnt["obj_id"] = response.obj_id
        if name == "save_vhca_state" and response.status == CmdStatus.OK:
            self.world.fw.advance_clock(0)  # the SAVE completes
            self.learnt["image"] = self.completions[-1].actual_image_size
        return response


async def test_every_command_answers_on_the_queue_as_its_unary_rpc() -> None:
    """Two firmwares in the same state take the same commands, one through
    the unary RPCs and one through the queue: the same outboxes (refusals and
    an injected fault included) and the same fwemu_commands counts."""
    assert {name for name, _ in STEPS} == set(QUEUED)  # every command kind
    worlds = [await serve(), await serve()]
    try:
        unary, queued = Driver(worlds[0], queued=False), Driver(worlds[1], queued=True)
        for d in (unary, queued):
            await d.prepare()
        for k, (name, build) in enumerate(STEPS, start=1):
            a = await unary.run(k, name, build(unary.learnt))
            b = await queued.run(k, name, build(queued.learnt))
            assert a == b, (k, name)
        assert worlds[0].fw.stats.commands == worlds[1].fw.stats.commands
        faulted = (Opcode.QUERY_VHCA_MIGRATION_STATE, CmdStatus.BAD_RES_STATE_ERR)
        assert worlds[1].fw.stats.commands[faulted] == 1
        queued.call.cancel()
    finally:
        for w in worlds:
            await w.close()


# --- tokens, concurrency and bounds -----------------------------------------------------


async def test_answers_go_back_as_commands_finish_matched_by_token(world: World) -> None:
    """A delayed command does not hold back the others: answers come out of
    order, each with its command's token (any token value is the driver's)."""
    delay_queries(world.fw, 1, count=1)
    call = world.stub().CommandQueue()
    await post(call, query(2**64 - 1, vhca_id=1), query(0, vhca_id=2), query(5, vhca_id=99))
    first = await answers(call, 2)
    assert [a.token for a in first] == [0, 5]
    assert first[0].query_vhca_migration_state.status == CmdStatus.OK
    assert first[1].query_vhca_migration_state.status == CmdStatus.BAD_PARAM_ERR  # no VF 99
    world.fw.advance_clock(1.0)
    (late,) = await answers(call, 1)
    assert late.token == 2**64 - 1 and late.query_vhca_migration_state.status == CmdStatus.OK
    call.cancel()


async def test_a_full_queue_refuses_the_command_past_32_and_goes_on(world: World) -> None:
    """32 commands in flight: the 33rd is refused RESOURCE_EXHAUSTED
    (QUEUE_FULL) without running; the 32 answer, then the queue takes more."""
    delay_queries(world.fw, 1, count=QUEUE_SLOTS)
    call = world.stub().CommandQueue()
    await post(call, *(query(t) for t in range(1, QUEUE_SLOTS + 1)))
    await post(call, query(100, vhca_id=2))
    (full,) = await answers(call, 1)
    assert full.token == 100 and full.WhichOneof("answer") == "refused"
    assert full.refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert (full.refused.reason, full.refused.domain) == ("QUEUE_FULL", "fwemu.emulator")
    assert sum(world.fw.stats.commands.values()) == QUEUE_SLOTS  # the 33rd never ran
    world.fw.advance_clock(1.0)
    done = await answers(call, QUEUE_SLOTS)
    assert sorted(a.token for a in done) == list(range(1, QUEUE_SLOTS + 1))
    await post(call, query(101, vhca_id=2))
    (again,) = await answers(call, 1)
    assert again.query_vhca_migration_state.status == CmdStatus.OK
    call.cancel()


async def test_a_duplicate_token_is_refused_and_the_command_in_flight_answers(
    world: World,
) -> None:
    delay_queries(world.fw, 1, count=1)
    call = world.stub().CommandQueue()
    await post(call, query(9, vhca_id=1))
    await post(call, query(9, vhca_id=2))
    (dup,) = await answers(call, 1)
    assert dup.token == 9 and dup.refused.reason == "DUPLICATE_TOKEN"
    assert dup.refused.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    world.fw.advance_clock(1.0)
    (first,) = await answers(call, 1)
    assert first.token == 9 and first.query_vhca_migration_state.status == CmdStatus.OK
    call.cancel()


async def test_a_command_naming_no_command_is_unimplemented(world: World) -> None:
    call = world.stub().CommandQueue()
    await post(call, fpb.QueuedCommand(token=4), query(5))
    unknown, ok = await answers(call, 2)
    assert unknown.token == 4 and unknown.refused.reason == "UNKNOWN_COMMAND"
    assert unknown.refused.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert ok.token == 5 and ok.query_vhca_migration_state.status == CmdStatus.OK
    call.cancel()


async def test_an_oversized_batch_ends_its_stream_only(world: World) -> None:
    """33 commands in one batch: that stream ends INVALID_ARGUMENT
    (BATCH_TOO_LARGE) and none of them runs; another client's queue, open
    meanwhile, answers on."""
    stub = world.stub()
    other = world.stub().CommandQueue()
    hostile = stub.CommandQueue()
    await post(hostile, *(query(t) for t in range(QUEUE_SLOTS + 1)))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await hostile.read()
    info = error_info(e.value)
    assert (info.code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    assert not world.fw.stats.commands
    await post(other, query(1))
    (a,) = await answers(other, 1)
    assert a.query_vhca_migration_state.status == CmdStatus.OK
    other.cancel()


async def test_a_hostile_client_does_not_reach_another_clients_queue(world: World) -> None:
    """While one client floods its queue with duplicates, unknown commands and
    commands past its slots, another's commands all answer, in order, OK."""
    delay_queries(world.fw, 1, count=QUEUE_SLOTS)
    hostile = world.stub().CommandQueue()
    honest = world.stub().CommandQueue()
    await post(hostile, *(query(7) for _ in range(QUEUE_SLOTS)))
    for _ in range(20):
        await post(hostile, *(fpb.QueuedCommand(token=t) for t in range(QUEUE_SLOTS)))
        await post(honest, query(1, vhca_id=2))
        (a,) = await answers(honest, 1)
        assert a.token == 1 and a.query_vhca_migration_state.status == CmdStatus.OK
    hostile.cancel()
    honest.cancel()


async def test_a_client_that_reads_no_answers_is_not_read_from() -> None:
    """CommandQueueStream itself: once `slots` answers wait to be sent, it
    reads no more requests (so what a stream holds stays bounded): here one
    batch of answers handed to the stream, which the client never takes, and
    `slots` answers waiting behind it."""
    read = 0

    async def requests() -> AsyncIterator[fpb.CommandQueueRequest]:
        nonlocal read
        for t in range(100):
            read += 1
            yield fpb.CommandQueueRequest(commands=[query(t)])

    fw = Firmware(VirtualClock(), seed=1)
    fw.create_vfs(1, VF)

    def execute(cls: Any, request: Any) -> Any:
        return fw.exec(cls(request.vhca_id, 0, False, False))

    queue = CommandQueueStream(execute, fw.sleep, asyncio.Event(), slots=4)
    out = cast(AsyncGenerator[fpb.CommandQueueResponse, None], queue.answers(requests()))
    first = await out.__anext__()  # the stream's writer takes one batch, then stalls
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(first.answers) == 4
    assert read == 2 * 4  # not the 100 the client sent
    await out.aclose()


async def test_a_principal_without_the_driver_role_is_denied(pki: Any) -> None:
    """Under mutual TLS a tenant's queue ends PERMISSION_DENIED, as its unary
    calls do, and no command reaches the firmware."""
    fw = Firmware(VirtualClock(), seed=1)
    fw.create_vfs(1, VF)
    server = FirmwareServer(fw, roles=pki.roles())
    port = await server.start("127.0.0.1:0", tls_config=pki.server_tls())
    try:
        async with aio_channel(f"127.0.0.1:{port}", pki.client_tls("team-a")) as ch:
            call = cast(Any, fgrpc.FirmwareStub(ch)).CommandQueue()
            with pytest.raises(grpc.aio.AioRpcError) as e:  # the write, or else the read
                await post(call, query(1))
                await call.read()
    finally:
        await server.stop(0)
    info = error_info(e.value)
    assert (info.code, info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert info.metadata["principal"] == pki.principal("team-a")
    assert not fw.stats.commands
