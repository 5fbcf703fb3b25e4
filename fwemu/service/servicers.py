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
from ..link.ifc import (
    CmdResult,
    Command,
    CreatePageTrackIn,
    DestroyPageTrackIn,
    FirmwareError,
    FunctionLevelResetIn,
    LoadVhcaStateIn,
    MiB,
    ModifyPageTrackIn,
    NoSuchVf,
    QueryHcaCapIn,
    QueryVhcaMigrationStateIn,
    ResumeVhcaIn,
    SaveCompletion,
    SaveVhcaStateIn,
    SuspendVhcaIn,
    obj_type_index,
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
from ..scenario import ScenarioError
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
        r = self.fw.exec(command_from_pb(cls, request))
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
        r = self.memory.create(
            client_of(context),
            request.length,
            shm_name=request.shm_name if backing == "shm_name" else None,
            remote=backing == "remote" and request.remote,
        )
        return to_pb(r, fpb.CreateMkeyResponse)

    async def DestroyMkey(self, request: fpb.DestroyMkeyRequest, context: Ctx) -> Any:
        return to_pb(self.memory.destroy(request.mkey), fpb.CommandResponse)

    async def ReadMkey(
        self, request: fpb.ReadMkeyRequest, context: Ctx
    ) -> AsyncIterator[fpb.MkeyData]:
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


def _refusal(*errors: type[Exception]) -> Callable[[Rpc[S]], Rpc[S]]:
    """A Scenario RPC whose refused request (one of `errors`) aborts the call
    with a google.rpc.Status naming why."""

    def wrap(rpc: Rpc[S]) -> Rpc[S]:
        @functools.wraps(rpc)
        async def answer(self: S, request: Any, context: Ctx) -> Any:
            try:
                return await rpc(self, request, context)
            except errors as e:
                if isinstance(e, NoSuchVf):
                    code, reason = grpc.StatusCode.NOT_FOUND, "NO_SUCH_VF"
                elif isinstance(e, ScenarioError):
                    code, reason = grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SCENARIO"
                else:
                    code, reason = grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"
                await abort(context, code, str(e), reason=reason, domain=DOMAIN)

        return answer

    return wrap


class ScenarioServicer(sgrpc.ScenarioServicer):
    def __init__(self, fw: Firmware) -> None:
        self.fw = fw

    def _info(self, vhca_id: int) -> spb.VfInfo:
        return to_pb(self.fw.info(vhca_id), spb.VfInfo)

    @_refusal(FirmwareError, ValueError)
    async def CreateVfs(self, request: spb.CreateVfsRequest, context: Ctx) -> Any:
        vfs = self.fw.create_vfs(request.count or 1, overlay(self.fw.defaults, request.config))
        return spb.CreateVfsResponse(vfs=[to_pb(vf_info(v), spb.VfInfo) for v in vfs])

    @_refusal(FirmwareError)
    async def RemoveVf(self, request: spb.RemoveVfRequest, context: Ctx) -> Any:
        self.fw.remove_vf(request.vhca_id)
        return spb.RemoveVfResponse()

    @_refusal(FirmwareError, ValueError)
    async def ConfigureVf(self, request: spb.ConfigureVfRequest, context: Ctx) -> Any:
        vf = self.fw.vf(request.vhca_id)
        self.fw.configure_vf(request.vhca_id, **changes(vf.config, request.config))
        return self._info(request.vhca_id)

    @_refusal(FirmwareError)
    async def GetVf(self, request: spb.GetVfRequest, context: Ctx) -> Any:
        return self._info(request.vhca_id)

    async def ListVfs(self, request: spb.ListVfsRequest, context: Ctx) -> Any:
        return spb.ListVfsResponse(vfs=[to_pb(v, spb.VfInfo) for v in self.fw.list_vfs()])

    @_refusal(FirmwareError, ValueError)
    async def Reconfigure(self, request: spb.ReconfigureRequest, context: Ctx) -> Any:
        when = request.WhichOneof("when")
        objects = [(obj_type_index(o.type), o.size) for o in request.objects]
        tid = self.fw.reconfigure(
            request.vhca_id,
            objects,
            at_time=request.at_time if when == "at_time" else None,
            after_saved_bytes=request.after_saved_bytes if when == "after_saved_bytes" else None,
        )
        return spb.ReconfigureResponse(trigger_id=tid)

    @_refusal(FirmwareError, ValueError)
    async def InjectFault(self, request: spb.InjectFaultRequest, context: Ctx) -> Any:
        fid = self.fw.inject_fault(request.vhca_id, fault_from_pb(request.fault))
        return spb.InjectFaultResponse(fault_id=fid)

    @_refusal(FirmwareError)
    async def ClearFaults(self, request: spb.ClearFaultsRequest, context: Ctx) -> Any:
        return spb.ClearFaultsResponse(cleared=self.fw.clear_faults(request.vhca_id))

    @_refusal(FirmwareError)
    async def GetDigest(self, request: spb.GetDigestRequest, context: Ctx) -> Any:
        vf = self.fw.touch(request.vhca_id)
        return spb.GetDigestResponse(
            digest=vf.digest(), size=vf.state.size, num_objects=len(vf.state.objects)
        )

    @_refusal(ScenarioError)
    async def ApplyScenario(self, request: spb.ApplyScenarioRequest, context: Ctx) -> Any:
        vfs = self.fw.apply_scenario(request.text)
        return spb.ApplyScenarioResponse(vfs=[to_pb(vf_info(v), spb.VfInfo) for v in vfs])

    async def GetClock(self, request: spb.ClockRequest, context: Ctx) -> Any:
        return spb.ClockResponse(now=self.fw.now(), virtual=self.fw.clock.virtual)

    async def AdvanceClock(self, request: spb.AdvanceClockRequest, context: Ctx) -> Any:
        if not self.fw.clock.virtual:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "the firmware runs on the real clock (serve with --clock virtual)",
                reason="REAL_CLOCK",
                domain=DOMAIN,
            )
        if not 0 <= request.seconds < float("inf"):
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "the clock moves forward by a finite number of seconds",
                reason="INVALID_REQUEST",
                domain=DOMAIN,
            )
        return spb.ClockResponse(now=self.fw.advance_clock(request.seconds), virtual=True)
