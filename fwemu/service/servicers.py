"""Thin gRPC adapters over the Firmware model: decode, call, encode, map errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NoReturn, TypeVar

import grpc

from grpcsvc.errors import abort

from ..api.v1 import firmware_pb2 as fpb
from ..api.v1 import firmware_pb2_grpc as fgrpc
from ..api.v1 import scenario_pb2 as spb
from ..api.v1 import scenario_pb2_grpc as sgrpc
from ..link.ifc import (
    CmdResult,
    FirmwareError,
    MiB,
    NoSuchVf,
    SaveCompletion,
    obj_type_index,
)
from ..model.clock import Clock, VirtualClock, sleep
from ..model.firmware import Firmware, vf_info
from ..scenario import ScenarioError, apply_scenario, parse_scenario
from . import convert
from .memory import MkeyMemory

Ctx = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R", bound=CmdResult)

CLIENT_KEY = "x-fwemu-client"
DOMAIN = "fwemu.emulator"
_MAX_READ_CHUNK = 4 * MiB


def client_of(context: Ctx) -> str:
    """The caller's id: the client header GrpcLink sends, else the peer address."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_KEY and isinstance(value, str):
            return value
    return str(context.peer())


async def _answer(clock: Clock, result: R) -> R:
    await sleep(clock, result.delay_s)  # an injected DELAY fault
    return result


class FirmwareServicer(fgrpc.FirmwareServicer):
    def __init__(self, fw: Firmware, memory: MkeyMemory) -> None:
        self.fw = fw
        self.memory = memory
        self.stopping = asyncio.Event()  # set when the server starts shutting down

    async def QueryHcaCap(self, request: fpb.QueryHcaCapRequest, context: Ctx) -> Any:
        r = await _answer(
            self.fw.clock,
            self.fw.query_hca_cap(request.op_mod, request.other_function, request.function_id),
        )
        return convert.hca_cap_to_pb(r)

    async def QueryVhcaMigrationState(
        self, request: fpb.QueryVhcaMigrationStateRequest, context: Ctx
    ) -> Any:
        r = await _answer(
            self.fw.clock,
            self.fw.query_vhca_migration_state(
                request.vhca_id,
                op_mod=request.op_mod,
                incremental=request.incremental,
                chunk=request.chunk,
            ),
        )
        return convert.query_to_pb(r)

    async def SaveVhcaState(self, request: fpb.SaveVhcaStateRequest, context: Ctx) -> Any:
        r = await _answer(
            self.fw.clock,
            self.fw.save_vhca_state(
                request.vhca_id,
                op_mod=request.op_mod,
                incremental=request.incremental,
                set_track=request.set_track,
                va=request.va,
                mkey=request.mkey,
                size=request.size,
                token=request.token,
            ),
        )
        return convert.save_to_pb(r)

    async def LoadVhcaState(self, request: fpb.LoadVhcaStateRequest, context: Ctx) -> Any:
        r = await _answer(
            self.fw.clock,
            self.fw.load_vhca_state(
                request.vhca_id,
                op_mod=request.op_mod,
                va=request.va,
                mkey=request.mkey,
                size=request.size,
            ),
        )
        return convert.cmd_to_pb(r)

    async def SuspendVhca(self, request: fpb.SuspendVhcaRequest, context: Ctx) -> Any:
        r = await _answer(self.fw.clock, self.fw.suspend_vhca(request.vhca_id, request.op_mod))
        return convert.cmd_to_pb(r)

    async def ResumeVhca(self, request: fpb.ResumeVhcaRequest, context: Ctx) -> Any:
        r = await _answer(self.fw.clock, self.fw.resume_vhca(request.vhca_id, request.op_mod))
        return convert.cmd_to_pb(r)

    async def FunctionLevelReset(self, request: fpb.FunctionLevelResetRequest, context: Ctx) -> Any:
        return convert.cmd_to_pb(self.fw.function_level_reset(request.vhca_id))

    async def CreatePageTracker(self, request: fpb.CreatePageTrackerRequest, context: Ctx) -> Any:
        ranges = [(r.start_address, r.length) for r in request.ranges]
        r = self.fw.create_page_tracker(request.vhca_id, ranges, request.log_page_size)
        return convert.page_track_to_pb(r)

    async def ReportPageTracker(self, request: fpb.ReportPageTrackerRequest, context: Ctx) -> Any:
        r = self.fw.report_page_tracker(
            request.vhca_id, request.obj_id, request.range_start_address, request.length
        )
        return convert.page_track_to_pb(r)

    async def DestroyPageTracker(self, request: fpb.DestroyPageTrackerRequest, context: Ctx) -> Any:
        return convert.cmd_to_pb(self.fw.destroy_page_tracker(request.vhca_id, request.obj_id))

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
                    yield convert.completion_to_pb(get.result())
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
        return fpb.CreateMkeyResponse(
            status=r.status, syndrome=r.syndrome, mkey=r.mkey, diagnostic=r.diagnostic
        )

    async def DestroyMkey(self, request: fpb.DestroyMkeyRequest, context: Ctx) -> Any:
        return convert.cmd_to_pb(self.memory.destroy(request.mkey))

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


class ScenarioServicer(sgrpc.ScenarioServicer):
    def __init__(self, fw: Firmware) -> None:
        self.fw = fw

    async def _fail(self, context: Ctx, e: Exception) -> NoReturn:
        if isinstance(e, NoSuchVf):
            code, reason = grpc.StatusCode.NOT_FOUND, "NO_SUCH_VF"
        elif isinstance(e, ScenarioError):
            code, reason = grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SCENARIO"
        else:
            code, reason = grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"
        await abort(context, code, str(e), reason=reason, domain=DOMAIN)

    def _info(self, vhca_id: int) -> spb.VfInfo:
        return convert.vf_info_to_pb(vf_info(self.fw.touch(vhca_id)))

    async def CreateVfs(self, request: spb.CreateVfsRequest, context: Ctx) -> Any:
        try:
            config = convert.config_overlay(self.fw.defaults, request.config)
            vfs = self.fw.create_vfs(request.count or 1, config)
        except (FirmwareError, ValueError) as e:
            await self._fail(context, e)
        return spb.CreateVfsResponse(vfs=[convert.vf_info_to_pb(vf_info(v)) for v in vfs])

    async def RemoveVf(self, request: spb.RemoveVfRequest, context: Ctx) -> Any:
        try:
            self.fw.remove_vf(request.vhca_id)
        except FirmwareError as e:
            await self._fail(context, e)
        return spb.RemoveVfResponse()

    async def ConfigureVf(self, request: spb.ConfigureVfRequest, context: Ctx) -> Any:
        try:
            vf = self.fw.vf(request.vhca_id)
            changes = convert.config_changes(request.config)
            changes["caps"] = convert.caps_overlay(vf.config.caps, request.config.caps)
            self.fw.configure_vf(request.vhca_id, **changes)
            return self._info(request.vhca_id)
        except (FirmwareError, ValueError) as e:
            await self._fail(context, e)

    async def GetVf(self, request: spb.GetVfRequest, context: Ctx) -> Any:
        try:
            return self._info(request.vhca_id)
        except FirmwareError as e:
            await self._fail(context, e)

    async def ListVfs(self, request: spb.ListVfsRequest, context: Ctx) -> Any:
        return spb.ListVfsResponse(vfs=[self._info(v) for v in sorted(self.fw.vfs)])

    async def Reconfigure(self, request: spb.ReconfigureRequest, context: Ctx) -> Any:
        when = request.WhichOneof("when")
        try:
            objects = [(obj_type_index(o.type), o.size) for o in request.objects]
            tid = self.fw.reconfigure(
                request.vhca_id,
                objects,
                at_time=request.at_time if when == "at_time" else None,
                after_saved_bytes=request.after_saved_bytes
                if when == "after_saved_bytes"
                else None,
            )
        except (FirmwareError, ValueError) as e:
            await self._fail(context, e)
        return spb.ReconfigureResponse(trigger_id=tid)

    async def InjectFault(self, request: spb.InjectFaultRequest, context: Ctx) -> Any:
        try:
            fid = self.fw.inject_fault(request.vhca_id, convert.fault_from_pb(request.fault))
        except (FirmwareError, ValueError) as e:
            await self._fail(context, e)
        return spb.InjectFaultResponse(fault_id=fid)

    async def ClearFaults(self, request: spb.ClearFaultsRequest, context: Ctx) -> Any:
        try:
            n = self.fw.clear_faults(request.vhca_id)
        except FirmwareError as e:
            await self._fail(context, e)
        return spb.ClearFaultsResponse(cleared=n)

    async def GetDigest(self, request: spb.GetDigestRequest, context: Ctx) -> Any:
        try:
            vf = self.fw.touch(request.vhca_id)
        except FirmwareError as e:
            await self._fail(context, e)
        return spb.GetDigestResponse(
            digest=vf.digest(), size=vf.state.size, num_objects=len(vf.state.objects)
        )

    async def ApplyScenario(self, request: spb.ApplyScenarioRequest, context: Ctx) -> Any:
        try:
            vfs = apply_scenario(self.fw, parse_scenario(request.text))
        except ScenarioError as e:
            await self._fail(context, e)
        return spb.ApplyScenarioResponse(vfs=[convert.vf_info_to_pb(vf_info(v)) for v in vfs])

    async def GetClock(self, request: spb.ClockRequest, context: Ctx) -> Any:
        return spb.ClockResponse(now=self.fw.clock.now(), virtual=self.fw.clock.virtual)

    async def AdvanceClock(self, request: spb.AdvanceClockRequest, context: Ctx) -> Any:
        clock = self.fw.clock
        if not isinstance(clock, VirtualClock):
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
        clock.advance(request.seconds)
        return spb.ClockResponse(now=clock.now(), virtual=True)
