"""The Vfio gRPC service: a thin adapter from RPCs to the VFIO core and the
mlx5vf driver.  Decode, call, encode; a VfioError becomes its errno.

Every call is made by a principal (grpcsvc.tls.principal: the client
certificate's identity, else the one ANONYMOUS), and x-vfio-client names a
process within it (README, "Principals and owned devices")."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message

from grpcsvc.access import Roles
from grpcsvc.memory import return_free_memory_to_the_os
from grpcsvc.tls import principal

from ..api import CLIENT_KEY
from ..api.v1 import vfio_pb2 as pb
from ..api.v1 import vfio_pb2_grpc as pbg
from ..api.wire import ReadAnswer, WriteChunk
from ..events import CALLER, PRINCIPAL, ErrorAnswered, Event, Payload, Subscription
from ..mlx5.latency import LatencyHistogram
from ..registry import DRIVER_NAME, DeviceRegistry
from ..vfio.errors import VfioError
from ..vfio.ops import MigrationFile
from . import typed
from .errnos import UNEXPECTED, abort_errno, as_vfio_error, errno_name, errno_of
from .fdcalls import MAX_READ, StreamCalls, StreamReq, StreamResp, no_then, read_into, write_from
from .ioctls import (
    IOCTL_OPERATIONS,
    IOCTL_TRANSPORTS,
    answer_ioctl,
    close_fd,
    device_feature,
    feature_operation,
    feature_response,
    precopy_info,
)
from .process import CLIENT_IDLE, DataFd, DeviceFd, Process, ProcessKey, reap_idle
from .uninterruptible import Calls
from .usermap import MappedSegments

log = logging.getLogger("vfio-driver")
Ctx = grpc.aio.ServicerContext[Any, Any]
# Ioctl streams one client may have open at once (vfioclient opens at most 64).
MAX_IOCTL_STREAMS = 128

EVENTS_KEY = "x-vfio-events"  # initial metadata of an Events stream: "subscribed"
DEFAULT_CHUNK = 1 << 20

# Event payload kind -> its message (the Event oneof's field of that name)
_PAYLOAD_PB: dict[str, type[Message]] = {
    "state_change": pb.StateChange,
    "precopy_info": pb.PrecopyInfoAnswer,
    "save_completed": pb.SaveCompleted,
    "save_failed": pb.SaveFailed,
    "error": pb.ErrorAnswer,
    "audit": pb.Finding,
    "dropped": pb.EventsDropped,
}


class VfioServicer(pbg.VfioServicer):
    def __init__(
        self,
        registry: DeviceRegistry,
        *,
        shm_dir: str | None = None,
        client_idle: float = CLIENT_IDLE,
        clock: Callable[[], float] = time.monotonic,
        roles: Roles | None = None,
    ) -> None:
        """`shm_dir`: where MapUserMemory finds clients' segments (/dev/shm);
        `client_idle`: how long a client with nothing open is remembered;
        `roles`: whose Events and Audit show every device (admins)."""
        self.registry = registry
        self.roles = roles if roles is not None else Roles()
        self.client_idle = client_idle
        self.clock = clock
        self._next_reap = 0.0
        self.shm_dir = shm_dir
        self.events = registry.events
        self.audit = registry.audit
        self.processes: dict[ProcessKey, Process] = {}
        self.segments = MappedSegments()  # MapUserMemory's files, of every client
        # Every errno answer the service gave, by errno name ("ENOMSG").
        self.errors_by_errno: Counter[str] = Counter()
        # How long DeviceFeature and PrecopyInfo took, by (operation, transport):
        # transport "unary" (their RPCs) or "stream" (the Ioctl stream).
        self.ioctl_seconds: dict[tuple[str, str], LatencyHistogram] = {
            (op, transport): LatencyHistogram()
            for op in IOCTL_OPERATIONS
            for transport in IOCTL_TRANSPORTS
        }
        # Set when the server starts to stop: Session and Events streams end
        # (they are no work in progress to drain) and fds are closed once
        # calls drained.
        self.stopping = asyncio.Event()
        # ioctls, close(2) and write(2) run to their end if their caller goes away.
        self.calls = Calls()

    # --- callers -----------------------------------------------------------------------

    def _caller(self, context: Ctx) -> ProcessKey:
        """The caller: its principal and its x-vfio-client (else its peer
        address); events of the call name them."""
        client = None
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_KEY and isinstance(value, str):
                client = value
        if client is None:
            client = f"peer:{context.peer()}"
        who = principal(context)
        CALLER.set(client)
        PRINCIPAL.set(who)
        return who, client

    def process(self, context: Ctx) -> Process:
        """The caller's descriptor table; events of the call name the caller."""
        key = self._caller(context)
        now = self.clock()
        if now >= self._next_reap:
            # A sweep at most every half idle time: a call stays O(1) amortized.
            reap_idle(self.processes, now, self.client_idle)
            self._next_reap = now + self.client_idle / 2
        proc = self.processes.get(key)
        if proc is None:
            proc = self.processes[key] = Process(
                key[1],
                self.audit,
                self.shm_dir,
                principal=key[0],
                holders=self.registry.holders,
                segments=self.segments,
            )
        proc.last_used = now
        return proc

    async def _fail(
        self,
        context: Ctx,
        e: VfioError,
        operation: str,
        *,
        device: str = "",
        proc: Process | None = None,
        fd: int = -1,
        extra: Mapping[str, str] | None = None,
    ) -> NoReturn:
        """Answer with e's errno: counted, and an error event (on the device
        of `fd` in `proc`, when that is open)."""
        self._errno_answered(e, operation, device=device, proc=proc, fd=fd)
        await abort_errno(context, e, extra)

    @contextlib.asynccontextmanager
    async def _answering(
        self,
        context: Ctx,
        operation: str,
        *,
        device: str = "",
        proc: Process | None = None,
        fd: int = -1,
        timed_since: float | None = None,
    ) -> AsyncIterator[_Answer]:
        """The body of an RPC: a VfioError it raises is the call's answer
        (_fail); `fd`, `extra` and `operation` of the yielded _Answer may be
        set as the call learns them. With `timed_since` (a perf_counter) the
        call is an ioctl timed in vfio_ioctl_seconds, before its answer goes
        out: whoever has the answer finds it counted."""
        answer = _Answer(fd, operation=operation)
        try:
            yield answer
        except UNEXPECTED as e:  # VfioError is an OSError
            self._ioctl_timed(answer.operation, timed_since)
            timed_since = None
            await self._fail(
                context,
                as_vfio_error(e),
                answer.operation,
                device=device,
                proc=proc,
                fd=answer.fd,
                extra=answer.extra,
            )
        finally:
            self._ioctl_timed(answer.operation, timed_since)

    def _ioctl_timed(self, operation: str, since: float | None) -> None:
        if since is not None:
            self.ioctl_seconds[operation, "unary"].observe(time.perf_counter() - since)

    def _errno_answered(
        self,
        e: VfioError,
        operation: str,
        *,
        device: str = "",
        proc: Process | None = None,
        fd: int = -1,
    ) -> int:
        """Count, publish and log an errno answer; the errno."""
        code = errno_of(e)
        name = errno_name(code)
        self.errors_by_errno[name] += 1
        # ENOMSG / EAGAIN are a data fd's "nothing now": routine, logged at debug.
        level = logging.DEBUG if code in (errno.ENOMSG, errno.EAGAIN) else logging.INFO
        if self.events.subscribers or log.isEnabledFor(level):
            data_fd, stream = -1, 0
            entry = proc.fds.get(fd) if proc is not None else None
            if entry is not None:
                device = entry.device.name
                if isinstance(entry, DataFd):
                    data_fd, stream = fd, entry.stream
            if self.events.subscribers:
                self.events.publish(
                    device,
                    ErrorAnswered(code, name, operation, str(e)),
                    data_fd=data_fd,
                    stream=stream,
                )
            log.log(
                level,
                "%s: %s (%s)",
                operation,
                name,
                e,
                extra={
                    "device": device or None,
                    "operation": operation,
                    "errno": name,
                    "client": proc.client if proc is not None else None,
                    "principal": proc.principal if proc is not None else None,
                    "fd": fd if fd >= 0 else None,
                    "stream": stream or None,
                },
            )
        return code

    async def Session(
        self, request: pb.SessionRequest, context: Ctx
    ) -> AsyncIterator[pb.SessionEvent]:
        proc = self.process(context)
        proc.sessions += 1
        try:
            yield pb.SessionEvent(client=proc.client)
            await self.stopping.wait()  # or until the client goes away
        finally:
            proc.sessions -= 1
            if proc.sessions == 0 and not self.stopping.is_set():
                await asyncio.shield(self._exit(proc))

    async def _exit(self, proc: Process) -> None:
        # Out of the table first: the client id starts afresh if it comes back.
        if self.processes.get(proc.key) is proc:
            del self.processes[proc.key]
        await proc.exit()
        if not self.processes and not self.stopping.is_set():
            # The last client went: the heap its migrations freed goes back to
            # the OS (glibc keeps it resident otherwise; benchmarks/soak.py).
            return_free_memory_to_the_os()

    async def close_all(self) -> None:
        self.stopping.set()
        await self.calls.drain()
        for proc in list(self.processes.values()):
            await self._exit(proc)

    # --- devices ----------------------------------------------------------------------

    async def ListDevices(self, request: pb.ListDevicesRequest, context: Ctx) -> Any:
        async with self._answering(context, "list_devices"):
            regs = await self.registry.refresh()
        return pb.ListDevicesResponse(
            devices=[
                pb.DeviceInfo(
                    name=r.core.name,
                    vhca_id=r.mvdev.caps.vhca_id,
                    function_id=r.mvdev.function_id,
                    migratable=r.mvdev.migratable,
                    migration_flags=r.mvdev.migration_flags,
                    open_count=r.core.open_count,
                    driver=DRIVER_NAME,
                )
                for r in regs
            ]
        )

    async def OpenDevice(self, request: pb.OpenDeviceRequest, context: Ctx) -> Any:
        proc = self.process(context)
        holders = self.registry.holders
        async with self._answering(context, "open", device=request.name):
            reg = await self.registry.lookup(request.name, fresh=True)

            async def open_device() -> tuple[int, Any]:
                # EBUSY while another principal holds it, as a VFIO group's second opener.
                mvdev = reg.mvdev
                telling = await holders.open(
                    reg.core, proc.principal, mvdev.link, mvdev.caps.vhca_id
                )
                try:
                    return proc.install(DeviceFd(reg.core)), telling
                except VfioError:
                    await holders.close(reg.core, proc.principal)
                    raise

            fd, telling = await self.calls.run(open_device())
        # The holder may use Scenario on its VF once the call returns.
        await telling.wait(holders.wait)
        return pb.OpenDeviceResponse(fd=fd)

    async def CloseFd(self, request: pb.CloseFdRequest, context: Ctx) -> Any:
        proc = self.process(context)
        async with self._answering(context, "close", proc=proc, fd=request.fd):
            return await close_fd(self.calls, proc, request)

    async def DeviceFeature(self, request: pb.DeviceFeatureRequest, context: Ctx) -> Any:
        began = time.perf_counter()
        proc = self.process(context)
        async with self._answering(
            context, "device_feature", proc=proc, fd=request.fd, timed_since=began
        ) as answer:
            argsz, flags, arg = request.argsz, request.flags, request.data
            if request.HasField("typed"):
                argsz, flags, arg = typed.pack(request)
            answer.operation = feature_operation(flags)
            done = await device_feature(self.calls, proc, request, argsz, flags, arg)
        return feature_response(request, *done)

    async def DeviceReset(self, request: pb.DeviceResetRequest, context: Ctx) -> Any:
        proc = self.process(context)
        async with self._answering(context, "reset", proc=proc, fd=request.fd):
            await self.calls.run(proc.device(request.fd).reset())
        return pb.DeviceResetResponse()

    # --- data fds ------------------------------------------------------------------------

    async def Read(self, request: pb.ReadRequest, context: Ctx) -> Any:
        """Answers a ReadResponse as ReadChunk (wire.encode_read_response),
        the data read straight into it."""
        proc = self.process(context)
        async with self._answering(context, "read", proc=proc, fd=request.fd):
            file = proc.data(request.fd)
            answer = ReadAnswer(min(request.count, MAX_READ))
            await file.readinto(answer, nonblock=request.nonblock)
        return answer.chunk()

    async def ReadStream(self, request: pb.ReadStreamRequest, context: Ctx) -> AsyncIterator[Any]:
        """Answers ReadResponses as ReadChunk (wire.encode_read_response),
        the data read straight into each."""
        chunk = min(request.chunk_size or DEFAULT_CHUNK, MAX_READ)
        left = request.limit or -1
        proc = self.process(context)
        async with self._answering(context, "read", proc=proc, fd=request.fd):
            file = proc.data(request.fd)
            while left != 0:
                answer = ReadAnswer(chunk if left < 0 else min(chunk, left))
                if not await file.readinto(answer, nonblock=request.nonblock):
                    return
                if left > 0:
                    left -= answer.size
                yield answer.chunk()

    async def Write(self, request_iterator: Any, context: Ctx) -> Any:
        """`request_iterator` yields WriteChunk (wire.decode_write_request, see
        add_vfio_servicer), not the generated WriteRequest."""
        requests: AsyncIterator[WriteChunk] = request_iterator
        proc = self.process(context)
        written = 0
        file: MigrationFile | None = None
        async with self._answering(context, "write", proc=proc) as answer:
            answer.extra["written"] = "0"
            async for req in requests:
                if file is None:
                    answer.fd = req.fd
                    file = proc.data(req.fd)
                written += await self.calls.run(file.write(req.data))
                answer.extra["written"] = str(written)
        return pb.WriteResponse(written=written)

    # --- user memory: read(2)/write(2) through the client's shared memory ---------------

    async def MapUserMemory(self, request: pb.MapUserMemoryRequest, context: Ctx) -> Any:
        proc = self.process(context)
        async with self._answering(context, "map_user_memory", proc=proc):
            if proc.exited:
                raise VfioError(errno.EBADF, f"client {proc.client} has gone away")
            addr = await proc.memory.map(request.shm_name, request.length, uids=_peer_uids(context))
        return pb.MapUserMemoryResponse(addr=addr)

    async def UnmapUserMemory(self, request: pb.UnmapUserMemoryRequest, context: Ctx) -> Any:
        proc = self.process(context)
        async with self._answering(context, "unmap_user_memory", proc=proc):
            proc.memory.unmap(request.addr)
        return pb.UnmapUserMemoryResponse()

    async def ReadInto(self, request: pb.ReadIntoRequest, context: Ctx) -> Any:
        proc = self.process(context)
        async with self._answering(context, "read", proc=proc, fd=request.fd):
            no_then(request, "ReadInto")
            n = await read_into(proc, request)
        return pb.ReadIntoResponse(count=n)

    async def WriteFrom(self, request: pb.WriteFromRequest, context: Ctx) -> Any:
        proc = self.process(context)
        async with self._answering(context, "write", proc=proc, fd=request.fd):
            no_then(request, "WriteFrom")
            n = await self.calls.run(write_from(proc, request))
        return pb.WriteFromResponse(count=n)

    async def ReadIntoStream(
        self, request_iterator: AsyncIterator[pb.ReadIntoRequest], context: Ctx
    ) -> AsyncIterator[pb.ReadIntoResponse]:
        async for answer in self._each(
            request_iterator, context, "read", read_into, pb.ReadIntoResponse
        ):
            yield answer

    async def WriteFromStream(
        self, request_iterator: AsyncIterator[pb.WriteFromRequest], context: Ctx
    ) -> AsyncIterator[pb.WriteFromResponse]:
        def to_its_end(proc: Process, req: pb.WriteFromRequest) -> Awaitable[int]:
            return self.calls.run(write_from(proc, req))

        async for answer in self._each(
            request_iterator, context, "write", to_its_end, pb.WriteFromResponse
        ):
            yield answer

    async def _each(
        self,
        requests: AsyncIterator[StreamReq],
        context: Ctx,
        operation: str,
        call: Callable[[Process, StreamReq], Awaitable[int]],
        response: Callable[..., StreamResp],
    ) -> AsyncIterator[StreamResp]:
        """The stream form of ReadInto / WriteFrom (fdcalls.StreamCalls)."""
        proc = self.process(context)
        stream = StreamCalls(operation, call, response, self._errno_answered)
        async for req in requests:
            yield await stream.answer(proc, req)

    async def PrecopyInfo(self, request: pb.PrecopyInfoRequest, context: Ctx) -> Any:
        began = time.perf_counter()
        proc = self.process(context)
        async with self._answering(
            context, "precopy_info", proc=proc, fd=request.fd, timed_since=began
        ):
            return await precopy_info(self.calls, proc, request)

    # --- ioctls on one stream ------------------------------------------------------------

    async def Ioctl(
        self, request_iterator: AsyncIterator[pb.IoctlRequest], context: Ctx
    ) -> AsyncIterator[pb.IoctlAnswer]:
        """DeviceFeature, PrecopyInfo and CloseFd in band, one at a time in
        order (one thread's calls); each answered as its unary RPC is, with
        the same errnos, counters, events and logs."""
        proc = self.process(context)
        if proc.ioctl_streams >= MAX_IOCTL_STREAMS:  # as clone(2) past RLIMIT_NPROC
            e = VfioError(
                errno.EAGAIN,
                f"client {proc.client} has {MAX_IOCTL_STREAMS} Ioctl streams open, the most "
                "one client may: make ioctls on those, or as unary calls",
            )
            await self._fail(context, e, "ioctl", proc=proc)
        opened = proc
        opened.ioctl_streams += 1
        try:
            async for request in request_iterator:
                if proc.exited:  # forgotten while idle: the caller's table as it is now
                    proc = self.process(context)
                proc.last_used = self.clock()
                yield await answer_ioctl(
                    self.calls, proc, request, self._errno_answered, self.ioctl_seconds
                )
        finally:
            opened.ioctl_streams -= 1

    # --- events and audit ------------------------------------------------------------

    async def _device_filter(self, name: str, operation: str, context: Ctx) -> str | None:
        """A request's device ("" = all): None, or a device that exists (else ENOENT)."""
        if not name:
            return None
        async with self._answering(context, operation, device=name):
            await self.registry.lookup(name)
        return name

    async def Events(self, request: pb.EventsRequest, context: Ctx) -> AsyncIterator[pb.Event]:
        who, client = self._caller(context)
        device = await self._device_filter(request.device, "events", context)
        async with self._answering(context, "events", device=device or ""):
            sub = self.events.subscribe(
                device, client=client, principal=who, sees_all=self.roles.is_admin(who)
            )
        ender = asyncio.ensure_future(self._end_on_stop(sub))
        try:
            await context.send_initial_metadata(((EVENTS_KEY, "subscribed"),))
            async for ev in sub:
                yield _event_pb(ev)
        finally:
            ender.cancel()
            sub.close()

    async def _end_on_stop(self, sub: Subscription) -> None:
        await self.stopping.wait()
        sub.close()

    async def Audit(self, request: pb.AuditRequest, context: Ctx) -> Any:
        who, _ = self._caller(context)
        device = await self._device_filter(request.device, "audit", context)
        # A principal that does not see everything reads the devices it holds.
        seen_by = None if self.roles.is_admin(who) else who
        return pb.AuditResponse(
            findings=[_payload_pb(f) for f in self.audit.findings(device, principal=seen_by)],
            counts=dict(self.audit.device_counts(device, principal=seen_by)),
        )


@dataclass
class _Answer:
    """What an RPC's error answer says besides the error: the fd it was
    about and extra ErrorInfo metadata."""

    fd: int = -1
    extra: dict[str, str] = field(default_factory=dict)
    operation: str = ""


def _peer_uids(context: Ctx) -> frozenset[int] | None:
    """Who may own a segment the caller maps: over a unix socket (whose file
    mode admits the socket owner's uid and root) this uid or root; over TCP
    the caller's uid is unknown (None)."""
    if context.peer().startswith("unix:"):
        return frozenset({os.geteuid(), 0})
    return None


def _payload_pb(p: Payload) -> Any:
    return _PAYLOAD_PB[p.kind](**asdict(p))


def _event_pb(ev: Event) -> pb.Event:
    return pb.Event(
        time=ev.time,
        device=ev.device,
        client=ev.client,
        data_fd=ev.data_fd,
        stream=ev.stream,
        **{ev.kind: _payload_pb(ev.payload)},
    )
