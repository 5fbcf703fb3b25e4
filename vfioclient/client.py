"""An async client of the vfio-driver service that reads like ioctl code.

    async with await VfioClient.connect("127.0.0.1:50052") as c:
        fd = await c.open_device("0000:81:00.1")
        flags = await c.migration_flags(fd)
        data_fd = await c.set_state(fd, MigState.PRE_COPY)
        info = await c.precopy_info(data_fd)
        try:
            chunk = await c.read(data_fd, 1 << 20)
        except VfioClientError as e:
            if e.errno != errno.ENOMSG:
                raise

Failures raise VfioClientError, an OSError whose errno is the kernel's.  The
client keeps a Session open, so its fds close if it goes away.

Over TLS: `tls=ClientTls(ca, cert, key)` (grpcsvc.tls; cert and key for
mutual TLS, and then the certificate's identity is the principal the service
knows this client by); by default the VFIO_TLS_CA, VFIO_TLS_CERT and
VFIO_TLS_KEY environment variables, and plaintext without them; `tls=None`:
plaintext whatever the environment says.

Events (driver.api.events.Event) and the audit's findings (driver.api.events.Finding):

    async with c.events("0000:81:00.1") as events:
        await events.ready()  # subscribed: what happens from now on is seen
        async for ev in events:
            print(ev.kind, ev.to_dict())
    for f in (await c.audit("0000:81:00.1")).findings:
        print(f.rule, f.message, f.reference)
"""

from __future__ import annotations

import asyncio
import errno
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self, TypeVar

import grpc

from driver.api import CLIENT_KEY
from driver.api.events import PAYLOADS, Event, Finding, Payload
from driver.api.v1 import vfio_pb2 as pb
from driver.api.v1 import vfio_pb2_grpc as pbg
from driver.api.wire import WriteChunk, encode_write_request
from driver.vfio.uapi import (
    MIG_DATA_SIZE,
    MIG_STATE,
    MIGRATION,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_PRECOPY_INFO_REINIT,
    Feature,
    MigState,
)
from grpcsvc.errnames import errno_name
from grpcsvc.errors import error_info
from grpcsvc.server import CHANNEL_OPTIONS
from grpcsvc.tls import aio_channel

from .transport import FROM_ENV, TlsChoice, resolve_tls

T = TypeVar("T")
EVENTS_KEY = "x-vfio-events"  # the Events stream's initial metadata once subscribed
FEATURE_HEADER_SIZE = 8


class AsyncClosing:
    """A client that `async with` closes: its aclose() on the way out."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class VfioClientError(OSError):
    """A failed call: `errno` is the kernel's errno (ENOMSG, EINVAL, ...)."""

    def __init__(self, code: int, message: str, grpc_code: grpc.StatusCode | None = None) -> None:
        super().__init__(code, message)
        self.grpc_code = grpc_code

    @property
    def name(self) -> str:
        return errno_name(self.errno or 0)


def _error(e: grpc.aio.AioRpcError) -> VfioClientError:
    info = error_info(e)
    code = info.metadata.get("errno")
    if code is not None and code.isdigit():
        return VfioClientError(int(code), info.message, info.code)
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return VfioClientError(errno.ENOTCONN, f"driver unreachable: {e.details()}", e.code())
    return VfioClientError(errno.EIO, f"{e.code().name}: {e.details()}", e.code())


@dataclass(frozen=True)
class PrecopyInfo:
    argsz: int
    flags: int
    initial_bytes: int
    dirty_bytes: int

    @property
    def reinit(self) -> bool:
        return bool(self.flags & VFIO_PRECOPY_INFO_REINIT)


@dataclass
class FeatureResult:
    data: bytes
    user_memory: dict[int, bytes] = field(default_factory=dict)
    data_fd: int = -1


@dataclass(frozen=True)
class Device:
    name: str
    vhca_id: int
    function_id: int
    migratable: bool
    migration_flags: int
    open_count: int
    driver: str


class VfioClient(AsyncClosing):
    """One client (a 'process') of a vfio-driver service."""

    def __init__(
        self, target: str, *, client_id: str | None = None, tls: TlsChoice = FROM_ENV
    ) -> None:
        """`tls`: a grpcsvc.tls.ClientTls, None for plaintext, or (the
        default) the VFIO_TLS_* environment variables' TLS if they are set."""
        self.target = target
        self.client_id = client_id or f"vfioclient-{secrets.token_hex(6)}"
        self._metadata = ((CLIENT_KEY, self.client_id),)
        self.tls = resolve_tls(tls)
        self.channel = aio_channel(target, self.tls, options=CHANNEL_OPTIONS)
        self.stub = pbg.VfioStub(self.channel)
        # Write's requests encoded with one copy of the data (driver/api/wire.py).
        self._write = self.channel.stream_unary(
            "/vfio.v1.Vfio/Write",
            request_serializer=encode_write_request,
            response_deserializer=pb.WriteResponse.FromString,
        )
        self._session: grpc.aio.UnaryStreamCall[Any, Any] | None = None

    @classmethod
    async def connect(
        cls,
        target: str,
        *,
        client_id: str | None = None,
        timeout: float = 10.0,
        tls: TlsChoice = FROM_ENV,
    ) -> VfioClient:
        """Connect and open the session (so this client's fds close with it).
        A TLS file that cannot be read raises grpcsvc.tls.TlsError."""
        c = cls(target, client_id=client_id, tls=tls)
        try:
            c._session = c.stub.Session(pb.SessionRequest(), metadata=c._metadata)
            await asyncio.wait_for(c._session.read(), timeout)
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            await c.aclose()
            why = e.details() if isinstance(e, grpc.aio.AioRpcError) else "timed out"
            raise VfioClientError(
                errno.ENOTCONN, f"cannot reach the vfio-driver at {target}: {why}"
            ) from None
        return c

    async def aclose(self) -> None:
        if self._session is not None:
            self._session.cancel()
            self._session = None
        await self.channel.close(None)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None

    # --- devices ---------------------------------------------------------------------

    async def list_devices(self) -> list[Device]:
        m = await self._call(self.stub.ListDevices, pb.ListDevicesRequest())
        return [
            Device(
                d.name,
                d.vhca_id,
                d.function_id,
                d.migratable,
                d.migration_flags,
                d.open_count,
                d.driver,
            )
            for d in m.devices
        ]

    async def open_device(self, name: str) -> int:
        m = await self._call(self.stub.OpenDevice, pb.OpenDeviceRequest(name=name))
        return int(m.fd)

    async def close(self, fd: int) -> None:
        await self._call(self.stub.CloseFd, pb.CloseFdRequest(fd=fd))

    async def reset(self, fd: int) -> None:
        await self._call(self.stub.DeviceReset, pb.DeviceResetRequest(fd=fd))

    async def device_feature(
        self,
        fd: int,
        flags: int,
        data: bytes = b"",
        *,
        argsz: int | None = None,
        user_memory: Mapping[int, bytes] | None = None,
    ) -> FeatureResult:
        """VFIO_DEVICE_FEATURE: argsz defaults to the header plus `data`."""
        req = pb.DeviceFeatureRequest(
            fd=fd,
            argsz=FEATURE_HEADER_SIZE + len(data) if argsz is None else argsz,
            flags=flags,
            data=data,
            user_memory=[pb.UserBuffer(addr=a, data=b) for a, b in (user_memory or {}).items()],
        )
        m = await self._call(self.stub.DeviceFeature, req)
        return FeatureResult(m.data, {b.addr: b.data for b in m.user_memory}, m.data_fd)

    # --- migration features ------------------------------------------------------------

    async def migration_flags(self, fd: int) -> int:
        """GET MIGRATION: the device's VFIO_MIGRATION_* flags."""
        r = await self.device_feature(
            fd, Feature.MIGRATION | VFIO_DEVICE_FEATURE_GET, bytes(MIGRATION.size)
        )
        return int(MIGRATION.unpack_from(r.data)[0])

    async def _feature_supported(self, fd: int, flags: int) -> bool:
        """A VFIO_DEVICE_FEATURE call without data: False when the kernel
        does not support it (ENOTTY, EINVAL)."""
        try:
            await self.device_feature(fd, flags)
        except VfioClientError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL):
                return False
            raise
        return True

    async def probe(self, fd: int, feature: int, ops: int = 0) -> bool:
        """PROBE a feature (with GET/SET bits in `ops`): supported or not."""
        return await self._feature_supported(fd, feature | VFIO_DEVICE_FEATURE_PROBE | ops)

    async def dma_logging_supported(self, fd: int) -> bool:
        """PROBE DMA_LOGGING_START (QEMU's vfio_dma_logging_supported())."""
        return await self.probe(fd, Feature.DMA_LOGGING_START, VFIO_DEVICE_FEATURE_SET)

    async def enable_precopy_info_v2(self, fd: int) -> bool:
        """SET MIG_PRECOPY_INFOv2 (the REINIT opt-in); False on a kernel without it."""
        return await self._feature_supported(
            fd, Feature.MIG_PRECOPY_INFOv2 | VFIO_DEVICE_FEATURE_SET
        )

    async def get_state(self, fd: int) -> MigState:
        r = await self.device_feature(
            fd, Feature.MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_GET, bytes(MIG_STATE.size)
        )
        return MigState(MIG_STATE.unpack_from(r.data)[0])

    async def set_state(self, fd: int, state: MigState) -> int | None:
        """SET MIG_DEVICE_STATE; the new data fd when the arc returns one."""
        r = await self.device_feature(
            fd, Feature.MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_SET, MIG_STATE.pack(state, -1)
        )
        data_fd = MIG_STATE.unpack_from(r.data)[1]
        return None if data_fd < 0 else int(data_fd)

    async def data_size(self, fd: int) -> int:
        """GET MIG_DATA_SIZE: the estimated STOP_COPY bytes."""
        r = await self.device_feature(
            fd, Feature.MIG_DATA_SIZE | VFIO_DEVICE_FEATURE_GET, bytes(MIG_DATA_SIZE.size)
        )
        return int(MIG_DATA_SIZE.unpack_from(r.data)[0])

    # --- data fds ----------------------------------------------------------------------

    async def read(self, fd: int, count: int, *, nonblock: bool = False) -> bytes:
        m = await self._call(self.stub.Read, pb.ReadRequest(fd=fd, count=count, nonblock=nonblock))
        return bytes(m.data)

    async def read_stream(
        self, fd: int, *, chunk_size: int = 1 << 20, limit: int = 0, nonblock: bool = False
    ) -> AsyncIterator[bytes]:
        """read(2) repeatedly, server side: chunks until the end of stream (or,
        in PRE_COPY, until the data available now is sent: then ENOMSG)."""
        call = self.stub.ReadStream(
            pb.ReadStreamRequest(fd=fd, chunk_size=chunk_size, limit=limit, nonblock=nonblock),
            metadata=self._metadata,
        )
        try:
            async for m in call:
                yield m.data
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    async def write(self, fd: int, chunks: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> int:
        """write(2) each chunk in order; the total taken."""

        async def requests() -> AsyncIterator[WriteChunk]:
            if isinstance(chunks, bytes | bytearray | memoryview):
                yield WriteChunk(fd, chunks)
            elif isinstance(chunks, AsyncIterable):
                async for c in chunks:
                    yield WriteChunk(fd, c)
            else:
                for c in chunks:
                    yield WriteChunk(fd, c)

        m = await self._call(self._write, requests())
        return int(m.written)

    # --- user memory: the local data path ---------------------------------------------

    async def map_user_memory(self, shm_name: str, length: int) -> int:
        """MapUserMemory: the driver maps our segment (same host); its address.
        ENOENT when the driver cannot see it (another host)."""
        m = await self._call(
            self.stub.MapUserMemory, pb.MapUserMemoryRequest(shm_name=shm_name, length=length)
        )
        return int(m.addr)

    async def unmap_user_memory(self, addr: int) -> None:
        await self._call(self.stub.UnmapUserMemory, pb.UnmapUserMemoryRequest(addr=addr))

    async def read_into(self, fd: int, addr: int, count: int, *, nonblock: bool = False) -> int:
        """read(fd, addr, count) into mapped user memory: the bytes read (0: end of stream)."""
        m = await self._call(
            self.stub.ReadInto,
            pb.ReadIntoRequest(fd=fd, addr=addr, count=count, nonblock=nonblock),
        )
        return int(m.count)

    async def write_from(self, fd: int, addr: int, count: int) -> int:
        """write(fd, addr, count) from mapped user memory: the bytes taken."""
        m = await self._call(
            self.stub.WriteFrom, pb.WriteFromRequest(fd=fd, addr=addr, count=count)
        )
        return int(m.count)

    def read_into_stream(self, fd: int) -> ReadIntoCall:
        """ReadIntoStream on a data fd: `submit` reads ahead, `result` takes
        their counts in order; it ends after the read that returned 0."""
        return ReadIntoCall(self.stub.ReadIntoStream(None, metadata=self._metadata), fd)

    def write_from_stream(self, fd: int) -> WriteFromCall:
        """WriteFromStream on a data fd: `submit` writes ahead, `result` takes
        their counts in order."""
        return WriteFromCall(self.stub.WriteFromStream(None, metadata=self._metadata), fd)

    async def precopy_info(self, fd: int, *, flags: int = 0, argsz: int = 24) -> PrecopyInfo:
        m = await self._call(
            self.stub.PrecopyInfo, pb.PrecopyInfoRequest(fd=fd, argsz=argsz, flags=flags)
        )
        return PrecopyInfo(m.argsz, m.flags, m.initial_bytes, m.dirty_bytes)

    # --- events and audit --------------------------------------------------------------

    def events(self, device: str | None = None) -> EventStream:
        """Follow a device's events (all devices' without one) until the
        server stops or the stream is closed."""
        call = self.stub.Events(pb.EventsRequest(device=device or ""), metadata=self._metadata)
        return EventStream(call)

    async def audit(self, device: str | None = None) -> AuditReport:
        """The audit's findings about a device (every device's without one)."""
        m = await self._call(self.stub.Audit, pb.AuditRequest(device=device or ""))
        return AuditReport([_payload(Finding, f) for f in m.findings], dict(m.counts))


_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009  (the stubs do not declare it)


class _StreamCall:
    """A bidi call of requests answered one by one, in order."""

    def __init__(self, call: grpc.aio.StreamStreamCall[Any, Any], fd: int) -> None:
        self._call, self.fd = call, fd
        self.pending = 0  # submitted, not yet answered

    async def _submit(self, request: Any) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        except asyncio.InvalidStateError:  # the call has ended: raise how
            code = await self._call.code()
            if code != grpc.StatusCode.OK:
                try:
                    await self._call.read()
                except grpc.aio.AioRpcError as e:
                    raise _error(e) from None
            raise VfioClientError(errno.EPIPE, f"the stream has ended ({code.name})") from None
        self.pending += 1

    async def result(self) -> int | None:
        """The next answer's count in submission order (a failed request
        raises its errno; those after it, ECANCELED); None once the call
        ended OK."""
        try:
            m: Any = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        if m is _EOF:
            return None
        self.pending -= 1
        if m.errno:
            raise VfioClientError(m.errno, m.message)
        return int(m.count)

    async def close_writing(self) -> None:
        """No more requests (the answers still come)."""
        await self._call.done_writing()

    def cancel(self) -> None:
        self._call.cancel()


class ReadIntoCall(_StreamCall):
    async def submit(self, addr: int, count: int, *, nonblock: bool = False) -> None:
        await self._submit(
            pb.ReadIntoRequest(fd=self.fd, addr=addr, count=count, nonblock=nonblock)
        )


class WriteFromCall(_StreamCall):
    async def submit(self, addr: int, count: int) -> None:
        await self._submit(pb.WriteFromRequest(fd=self.fd, addr=addr, count=count))


@dataclass(frozen=True)
class AuditReport:
    findings: list[Finding]  # oldest first (the newest few hundred per device)
    counts: dict[str, int]  # findings by rule id, all of them


def _payload(cls: type[Payload], m: Any) -> Any:
    return cls(**{f.name: getattr(m, f.name) for f in fields(cls)})


def _event(m: pb.Event) -> Event | None:
    """None for a kind this client does not know (a newer server's)."""
    kind = m.WhichOneof("kind")
    if kind is None or kind not in PAYLOADS:
        return None
    payload = _payload(PAYLOADS[kind], getattr(m, kind))
    return Event(m.time, m.device, payload, m.client, m.data_fd, m.stream)


class EventStream(AsyncClosing):
    """An Events call: iterate it for `driver.api.events.Event`s; it ends when the
    server stops (or `aclose`).  `ready()` returns once the subscription is
    live, so nothing that happens after it is missed."""

    def __init__(self, call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
        self._call = call
        self._messages = call.__aiter__()

    async def ready(self) -> None:
        try:
            md = await self._call.initial_metadata()
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        if not any(k == EVENTS_KEY for k, _ in md or ()):
            async for _ in self:  # it failed before subscribing (ENOENT): raises that
                pass
            raise VfioClientError(errno.EIO, "the Events stream ended before subscribing")

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while True:
            try:
                m = await self._messages.__anext__()
            except grpc.aio.AioRpcError as e:
                raise _error(e) from None
            ev = _event(m)
            if ev is not None:
                return ev

    async def aclose(self) -> None:
        self._call.cancel()


async def read_all(client: VfioClient, fd: int, chunk_size: int = 1 << 20) -> bytes:
    """Read a data fd to its end (STOP_COPY)."""
    out = bytearray()
    async for chunk in client.read_stream(fd, chunk_size=chunk_size):
        out += chunk
    return bytes(out)
