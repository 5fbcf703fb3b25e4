"""Thin gRPC adapters over the Firmware model: decode, call, encode, map errors."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from grpcsvc.errors import abort

from ..api.v1 import firmware_pb2 as fpb
from ..api.v1 import firmware_pb2_grpc as fgrpc
from ..api.v1 import scenario_pb2 as spb
from ..api.v1 import scenario_pb2_grpc as sgrpc
from ..link import scenario_requests as rq
from ..link.ifc import (
    CmdResult,
    Command,
    CreatePageTrackIn,
    DestroyPageTrackIn,
    FunctionLevelResetIn,
    LoadVhcaStateIn,
    MiB,
    MkeyResult,
    ModifyPageTrackIn,
    QueryHcaCapIn,
    QueryVhcaMigrationStateIn,
    ResumeVhcaIn,
    SaveCompletion,
    SaveVhcaStateIn,
    SuspendVhcaIn,
)
from ..link.wire import (
    CLIENT_KEY,
    RPCS,
    changes,
    command_from_pb,
    fault_from_pb,
    overlay,
    to_pb,
)
from ..model.firmware import Firmware, vf_info
from ..scenario import apply_scenario, parse_scenario
from .failures import failure
from .memory import MkeyMemory

Ctx = grpc.aio.ServicerContext[Any, Any]
S = TypeVar("S")
Rpc = Callable[[S, Any, Ctx], Awaitable[Any]]

DOMAIN = "fwemu.emulator"
_MAX_READ_CHUNK = 4 * MiB


def client_of(context: Ctx) -> str:
    """The caller's id: the client header GrpcLink sends, else the peer address."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_KEY and isinstance(value, str):
            return value
    return str(context.peer())


def _command(cls: type[Command[Any]]) -> Any:
    """The RPC of one command: the request's in-struct through the model's
    command path, the outbox back.  (Any: it stands for the typed stub method.)"""

    async def rpc(self: FirmwareServicer, request: Any, context: Ctx) -> Any:
        self.memory.seen(client_of(context))
        try:
            r = self.fw.exec(command_from_pb(cls, request))
        except Exception as e:  # the firmware answers every command, even so
            f = failure(e)
            r = cls.out(status=f.status, syndrome=f.syndrome, diagnostic=f.message)
        await self.fw.sleep(r.delay_s)  # an injected DELAY fault
        return to_pb(r, RPCS[cls].response)

    rpc.__name__ = RPCS[cls].name
    return rpc


class FirmwareServicer(fgrpc.FirmwareServicer):
    def __init__(self, fw: Firmware, memory: MkeyMemory) -> None:
        self.fw = fw
        self.memory = memory
        self.stopping = asyncio.Event()  # set when the server starts shutting down

    QueryHcaCap = _command(QueryHcaCapIn)
    QueryVhcaMigrationState = _command(QueryVhcaMigrationStateIn)
    SaveVhcaState = _command(SaveVhcaStateIn)
    LoadVhcaState = _command(LoadVhcaStateIn)
    SuspendVhca = _command(SuspendVhcaIn)
    ResumeVhca = _command(ResumeVhcaIn)
    FunctionLevelReset = _command(FunctionLevelResetIn)
    CreatePageTracker = _command(CreatePageTrackIn)
    ReportPageTracker = _command(ModifyPageTrackIn)
    DestroyPageTracker = _command(DestroyPageTrackIn)

    async def Completions(
        self, request: fpb.CompletionsRequest, context: Ctx
    ) -> AsyncIterator[fpb.Completion]:
        """The completion EQ.  The first message (token 0) says the stream is
        subscribed; a client's mkeys go away with its last completion stream."""
        client = client_of(context)
        queue: asyncio.Queue[SaveCompletion] = asyncio.Queue()
        unsubscribe = self.fw.subscribe(queue.put_nowait, request.vhca_ids or None)
        self.memory.attach(client)
        try:
            yield fpb.Completion(token=0, timestamp=self.fw.clock.now())
            stopping = asyncio.ensure_future(self.stopping.wait())
            try:
                while True:
                    get = asyncio.ensure_future(queue.get())
                    await asyncio.wait({get, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        return  # the server is shutting down: end the stream (OK)
                    yield to_pb(get.result(), fpb.Completion)
            finally:
                stopping.cancel()
        finally:
            unsubscribe()
            self.memory.detach(client)

    async def CreateMkey(self, request: fpb.CreateMkeyRequest, context: Ctx) -> Any:
        backing = request.WhichOneof("backing")
        try:
            r = self.memory.create(
                client_of(context),
                request.length,
                shm_name=request.shm_name if backing == "shm_name" else None,
                remote=backing == "remote" and request.remote,
            )
        except Exception as e:  # as a command: an outbox, never UNKNOWN
            f = failure(e)
            r = MkeyResult(status=f.status, syndrome=f.syndrome, diagnostic=f.message)
        return to_pb(r, fpb.CreateMkeyResponse)

    async def DestroyMkey(self, request: fpb.DestroyMkeyRequest, context: Ctx) -> Any:
        self.memory.seen(client_of(context))
        try:
            r = self.memory.destroy(request.mkey)
        except Exception as e:
            f = failure(e)
            r = CmdResult(status=f.status, syndrome=f.syndrome, diagnostic=f.message)
        return to_pb(r, fpb.CommandResponse)

    async def ReadMkey(
        self, request: fpb.ReadMkeyRequest, context: Ctx
    ) -> AsyncIterator[fpb.MkeyData]:
        self.memory.seen(client_of(context))
        view = self.memory.range(request.mkey, request.offset, request.length)
        if isinstance(view, CmdResult):
            await abort(
                context,
                grpc.StatusCode.OUT_OF_RANGE,
                view.diagnostic,
                reason="MKEY_RANGE",
                domain=DOMAIN,
                metadata={"syndrome": str(view.syndrome), "status": str(view.status)},
            )
        step = min(request.chunk_size or MiB, _MAX_READ_CHUNK)
        for pos in range(0, len(view), step):
            yield fpb.MkeyData(
                mkey=request.mkey,
                offset=request.offset + pos,
                data=bytes(view[pos : pos + step]),
            )

    async def WriteMkey(self, request_iterator: AsyncIterator[fpb.MkeyData], context: Ctx) -> Any:
        self.memory.seen(client_of(context))
        mkey = None
        written = 0
        async for msg in request_iterator:
            mkey = msg.mkey if mkey is None else mkey
            view = self.memory.range(mkey, msg.offset, len(msg.data))
            if isinstance(view, CmdResult):
                return fpb.WriteMkeyResponse(
                    status=view.status,
                    syndrome=view.syndrome,
                    diagnostic=view.diagnostic,
                    bytes_written=written,
                )
            view[:] = msg.data
            written += len(msg.data)
        return fpb.WriteMkeyResponse(bytes_written=written)


def _answered(rpc: Rpc[S]) -> Rpc[S]:
    """A Scenario RPC whose refused request, or whose failure in the model
    (MemoryError, OSError, RecursionError...), aborts the call with a
    google.rpc.Status whose ErrorInfo names the condition (fwemu.service.failures)."""

    @functools.wraps(rpc)
    async def answer(self: S, request: Any, context: Ctx) -> Any:
        try:
            return await rpc(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            f = failure(e)
            await abort(context, f.code, f.message, reason=f.reason, domain=DOMAIN)

    return answer


class ScenarioServicer(sgrpc.ScenarioServicer):
    """Each request through the model's one scenario path (Firmware.control),
    which checks its values first."""

    def __init__(self, fw: Firmware) -> None:
        self.fw = fw

    @_answered
    async def CreateVfs(self, request: spb.CreateVfsRequest, context: Ctx) -> Any:
        config = overlay(self.fw.defaults, request.config)
        vfs = self.fw.control(rq.CreateVfsIn(request.count or 1, config))
        return spb.CreateVfsResponse(vfs=[to_pb(v, spb.VfInfo) for v in vfs])

    @_answered
    async def RemoveVf(self, request: spb.RemoveVfRequest, context: Ctx) -> Any:
        self.fw.control(rq.RemoveVfIn(request.vhca_id))
        return spb.RemoveVfResponse()

    @_answered
    async def ConfigureVf(self, request: spb.ConfigureVfRequest, context: Ctx) -> Any:
        vf = self.fw.vf(request.vhca_id)
        req = rq.ConfigureVfIn(request.vhca_id, changes(vf.config, request.config))
        return to_pb(self.fw.control(req), spb.VfInfo)

    @_answered
    async def GetVf(self, request: spb.GetVfRequest, context: Ctx) -> Any:
        return to_pb(self.fw.control(rq.GetVfIn(request.vhca_id)), spb.VfInfo)

    @_answered
    async def ListVfs(self, request: spb.ListVfsRequest, context: Ctx) -> Any:
        return spb.ListVfsResponse(vfs=[to_pb(v, spb.VfInfo) for v in self.fw.list_vfs()])

    @_answered
    async def Reconfigure(self, request: spb.ReconfigureRequest, context: Ctx) -> Any:
        when = request.WhichOneof("when")
        tid = self.fw.control(
            rq.ReconfigureIn(
                request.vhca_id,
                tuple((o.type, o.size) for o in request.objects),
                at_time=request.at_time if when == "at_time" else None,
                after_saved_bytes=request.after_saved_bytes
                if when == "after_saved_bytes"
                else None,
            )
        )
        return spb.ReconfigureResponse(trigger_id=tid)

    @_answered
    async def InjectFault(self, request: spb.InjectFaultRequest, context: Ctx) -> Any:
        fid = self.fw.control(rq.InjectFaultIn(request.vhca_id, fault_from_pb(request.fault)))
        return spb.InjectFaultResponse(fault_id=fid)

    @_answered
    async def ClearFaults(self, request: spb.ClearFaultsRequest, context: Ctx) -> Any:
        return spb.ClearFaultsResponse(cleared=self.fw.control(rq.ClearFaultsIn(request.vhca_id)))

    @_answered
    async def GetDigest(self, request: spb.GetDigestRequest, context: Ctx) -> Any:
        vf = self.fw.touch(request.vhca_id)
        return spb.GetDigestResponse(
            digest=vf.digest(), size=vf.state.size, num_objects=len(vf.state.objects)
        )

    @_answered
    async def ApplyScenario(self, request: spb.ApplyScenarioRequest, context: Ctx) -> Any:
        # Parsing a large text takes a while: off the event loop (it reads
        # no firmware state), so that other clients and health keep answering.
        doc = await asyncio.to_thread(parse_scenario, request.text)
        vfs = apply_scenario(self.fw, doc)
        return spb.ApplyScenarioResponse(vfs=[to_pb(vf_info(v), spb.VfInfo) for v in vfs])

    @_answered
    async def GetClock(self, request: spb.ClockRequest, context: Ctx) -> Any:
        return spb.ClockResponse(now=self.fw.now(), virtual=self.fw.clock.virtual)

    @_answered
    async def AdvanceClock(self, request: spb.AdvanceClockRequest, context: Ctx) -> Any:
        if not self.fw.clock.virtual:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "the firmware runs on the real clock (serve with --clock virtual)",
                reason="REAL_CLOCK",
                domain=DOMAIN,
            )
        now = self.fw.control(rq.AdvanceClockIn(request.seconds))
        return spb.ClockResponse(now=now, virtual=True)
