"""Thin gRPC adapters over the Firmware model: decode, call, encode, map errors;
and who may call what (fwemu.service.access), by the caller's principal."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from grpcsvc.access import Roles
from grpcsvc.errors import abort
from grpcsvc.tls import principal

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
    NoSuchVf,
    QueryHcaCapIn,
    QueryVhcaMigrationStateIn,
    ReconfigMode,
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
from .access import SCENARIO_REACH, Reach, admin_only, firmware_denied, reaches_vf
from .cmdqueue import CommandQueueStream
from .failures import DOMAIN, failure
from .memory import MkeyMemory, Owner

Ctx = grpc.aio.ServicerContext[Any, Any]
S = TypeVar("S")
Rpc = Callable[[S, Any, Ctx], Awaitable[Any]]

_MAX_READ_CHUNK = 4 * MiB


def client_of(context: Ctx) -> str:
    """The caller's id: the client header GrpcLink sends, else the peer address."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_KEY and isinstance(value, str):
            return value
    return str(context.peer())


async def _denied(context: Ctx, message: str, who: str) -> NoReturn:
    await abort(
        context,
        grpc.StatusCode.PERMISSION_DENIED,
        message,
        reason="PERMISSION_DENIED",
        domain=DOMAIN,
        metadata={"principal": who},
    )


def _command(cls: type[Command[Any]]) -> Any:
    """The unary RPC of one command: the caller checked, the command run
    (FirmwareServicer.execute), its outbox back after an injected DELAY.
    (Any: it stands for the typed stub method.)"""
    response = RPCS[cls].response

    async def rpc(self: FirmwareServicer, request: Any, context: Ctx) -> Any:
        r = self.execute(await self.caller(context), cls, request)
        await self.fw.sleep(r.delay_s)  # an injected DELAY fault
        return to_pb(r, response)

    rpc.__name__ = RPCS[cls].name
    return rpc


class FirmwareServicer(fgrpc.FirmwareServicer):
    """The Firmware service, for the drivers' and admins' principals only
    (`roles`; default: everyone without a client certificate, as before TLS)."""

    def __init__(self, fw: Firmware, memory: MkeyMemory, roles: Roles | None = None) -> None:
        self.fw = fw
        self.memory = memory
        self.roles = Roles() if roles is None else roles
        self.stopping = asyncio.Event()  # set when the server starts shutting down

    async def caller(self, context: Ctx) -> Owner:
        """Who calls: PERMISSION_DENIED unless a driver or an admin (a denial
        is no firmware answer: the command never reached the firmware)."""
        who = principal(context)
        if not self.roles.may_use_firmware(who):
            await _denied(context, firmware_denied(who), who)
        return Owner(who, client_of(context))

    def execute(self, owner: Owner, cls: type[Command[Any]], request: Any) -> CmdResult:
        """The service's one command path, for the unary RPCs and the command
        queue alike: the request's in-struct, with its caller's principal,
        through the model's command path; its outbox (the answer is due
        `delay_s` later)."""
        self.memory.seen(owner)
        try:
            r: CmdResult = self.fw.exec(command_from_pb(cls, request, principal=owner.principal))
            return r
        except Exception as e:  # the firmware answers every command, even so
            f = failure(e)
            return cls.out(status=f.status, syndrome=f.syndrome, diagnostic=f.message)

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

    async def CommandQueue(
        self, request_iterator: AsyncIterator[fpb.CommandQueueRequest], context: Ctx
    ) -> AsyncIterator[fpb.CommandQueueResponse]:
        """Every command on one stream (fwemu.service.cmdqueue): the caller is
        checked once, as the stream has one principal and one client id."""
        owner = await self.caller(context)
        queue = CommandQueueStream(
            functools.partial(self.execute, owner), self.fw.sleep, self.stopping
        )
        async for answers in queue.answers(request_iterator):
            yield answers
        if queue.violation is not None:
            v = queue.violation
            await abort(context, v.code, v.message, reason=v.reason, domain=DOMAIN)

    async def Completions(
        self, request: fpb.CompletionsRequest, context: Ctx
    ) -> AsyncIterator[fpb.Completion]:
        """The completion EQ.  The first message (token 0) says the stream is
        subscribed; a client's mkeys go away with its last completion stream."""
        owner = await self.caller(context)
        queue: asyncio.Queue[SaveCompletion] = asyncio.Queue()
        unsubscribe = self.fw.subscribe(queue.put_nowait, request.vhca_ids or None)
        self.memory.attach(owner)
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
            self.memory.detach(owner)

    async def CreateMkey(self, request: fpb.CreateMkeyRequest, context: Ctx) -> Any:
        owner = await self.caller(context)
        backing = request.WhichOneof("backing")
        try:
            r = self.memory.create(
                owner,
                request.length,
                shm_name=request.shm_name if backing == "shm_name" else None,
                remote=backing == "remote" and request.remote,
            )
        except Exception as e:  # as a command: an outbox, never UNKNOWN
            f = failure(e)
            r = MkeyResult(status=f.status, syndrome=f.syndrome, diagnostic=f.message)
        return to_pb(r, fpb.CreateMkeyResponse)

    async def DestroyMkey(self, request: fpb.DestroyMkeyRequest, context: Ctx) -> Any:
        owner = await self.caller(context)
        self.memory.seen(owner)
        try:
            r = self.memory.destroy(request.mkey, owner.principal)
        except Exception as e:
            f = failure(e)
            r = CmdResult(status=f.status, syndrome=f.syndrome, diagnostic=f.message)
        return to_pb(r, fpb.CommandResponse)

    async def ReadMkey(
        self, request: fpb.ReadMkeyRequest, context: Ctx
    ) -> AsyncIterator[fpb.MkeyData]:
        owner = await self.caller(context)
        self.memory.seen(owner)
        view = self.memory.range(request.mkey, request.offset, request.length, owner.principal)
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
        owner = await self.caller(context)
        self.memory.seen(owner)
        mkey = None
        written = 0
        async for msg in request_iterator:
            mkey = msg.mkey if mkey is None else mkey
            view = self.memory.range(mkey, msg.offset, len(msg.data), owner.principal)
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

    async def SetVfHolders(self, request: fpb.SetVfHoldersRequest, context: Ctx) -> Any:
        """No command: a refused request (an unknown VF) is a gRPC status."""
        await self.caller(context)
        try:
            req = rq.SetVfHoldersIn(request.vhca_id, frozenset(request.principals))
            self.fw.control(req)
        except Exception as e:
            f = failure(e)
            await abort(context, f.code, f.message, reason=f.reason, domain=DOMAIN)
        return fpb.SetVfHoldersResponse()


def _answered(rpc: Rpc[ScenarioServicer]) -> Rpc[ScenarioServicer]:
    """A Scenario RPC, after its reach (access.SCENARIO_REACH) is checked:
    PERMISSION_DENIED for an admin-only one, a VF the caller does not hold as
    no VF at all.  A refused request, or a failure in the model (MemoryError,
    OSError, RecursionError...), aborts the call with a google.rpc.Status
    whose ErrorInfo names the condition (fwemu.service.failures)."""
    reach = SCENARIO_REACH[rpc.__name__]

    @functools.wraps(rpc)
    async def answer(self: ScenarioServicer, request: Any, context: Ctx) -> Any:
        who = principal(context)
        if reach is Reach.ADMIN and not self.roles.is_admin(who):
            await _denied(context, admin_only(rpc.__name__, who), who)
        try:
            if reach is Reach.HOLDER and not self.reaches(who, request.vhca_id):
                raise NoSuchVf(request.vhca_id)
            return await rpc(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            f = failure(e)
            await abort(context, f.code, f.message, reason=f.reason, domain=DOMAIN)

    return answer


class ScenarioServicer(sgrpc.ScenarioServicer):
    """Each request through the model's one scenario path (Firmware.control),
    which checks its values first, for the principals `roles` lets reach it
    (fwemu.service.access; default: everyone without a client certificate)."""

    def __init__(self, fw: Firmware, roles: Roles | None = None) -> None:
        self.fw = fw
        self.roles = Roles() if roles is None else roles

    def reaches(self, who: str, vhca_id: int) -> bool:
        return reaches_vf(self.roles, self.fw.holders, who, vhca_id)

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
        who = principal(context)
        rq.check_function_ids(len(request.function_ids))  # before a set of them is made
        # A driver probes every VF (what SR-IOV tells the kernel), as admins
        # see them; anyone else only the VFs it holds: the others' are not
        # even revealed.
        sees_all = self.roles.is_admin(who) or self.roles.is_driver(who)
        vfs = self.fw.list_vfs(
            request.function_ids, None if sees_all else lambda v: self.reaches(who, v)
        )
        return spb.ListVfsResponse(vfs=[to_pb(v, spb.VfInfo) for v in vfs])

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
                # RECONFIGURE_MODE_UNSPECIFIED (a client from before the field): ADD.
                mode=request.mode or ReconfigMode.ADD,
            )
        )
        return spb.ReconfigureResponse(trigger_id=tid)

    @_answered
    async def ResetVf(self, request: spb.ResetVfRequest, context: Ctx) -> Any:
        return to_pb(self.fw.control(rq.ResetVfIn(request.vhca_id)), spb.VfInfo)

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
        digest = vf.suspended_digest() if request.suspended else vf.digest()
        return spb.GetDigestResponse(
            digest=digest, size=vf.state.size, num_objects=len(vf.state.objects)
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
