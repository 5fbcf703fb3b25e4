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
client keeps a Session open, so its fds close if it goes away.  The constants
are vfioclient.uapi's; the requests and answers vfioclient.calls', which the
blocking client (vfioclient.sync, for scripts, threads and gevent) shares.

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
import collections
import errno
import functools
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Self, TypeVar

import grpc

from driver.api.events import Event
from driver.api.v1 import vfio_pb2_grpc as pbg
from driver.api.wire import WriteChunk
from grpcsvc.options import CHANNEL_OPTIONS
from grpcsvc.tls import aio_channel

from . import calls
from .calls import (
    EVENTS_KEY,
    FEATURE_HEADER_SIZE,
    AuditReport,
    Device,
    FeatureResult,
    PrecopyInfo,
    VfioClientError,
)
from .calls import rpc_error as _error
from .ioctls import IOCTL_FIELDS, SEQUENCE_RPCS, IoctlLanes
from .transport import FROM_ENV, TlsChoice, resolve_tls
from .uapi import MigState

__all__ = [
    "EVENTS_KEY",
    "FEATURE_HEADER_SIZE",
    "AsyncClosing",
    "AuditReport",
    "Device",
    "EventStream",
    "FeatureResult",
    "PrecopyInfo",
    "ReadIntoCall",
    "VfioClient",
    "VfioClientError",
    "WriteFromCall",
    "read_all",
]

T = TypeVar("T")


class AsyncClosing:
    """A client that `async with` closes: its aclose() on the way out."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class VfioClient(AsyncClosing):
    """One client (a 'process') of a vfio-driver service."""

    def __init__(
        self,
        target: str,
        *,
        client_id: str | None = None,
        tls: TlsChoice = FROM_ENV,
        ioctl_streams: bool = True,
    ) -> None:
        """`tls`: a grpcsvc.tls.ClientTls, None for plaintext, or (the
        default) the VFIO_TLS_* environment variables' TLS if they are set.
        `ioctl_streams`: DeviceFeature and PrecopyInfo on the driver's Ioctl
        streams (vfioclient.ioctls); False: unary calls only."""
        self.target = target
        self.client_id = client_id or calls.new_client_id()
        # Built once: grpc.aio turns a tuple into Metadata on every call (~2 us).
        self._metadata = grpc.aio.Metadata(*calls.client_metadata(self.client_id))
        self.tls = resolve_tls(tls)
        self.channel = aio_channel(target, self.tls, options=CHANNEL_OPTIONS)
        self.stub = pbg.VfioStub(self.channel)
        self._write = calls.write_method(self.channel)
        self._session: grpc.aio.UnaryStreamCall[Any, Any] | None = None
        self._ioctls = IoctlLanes(self.channel, self._metadata)
        self._ioctls.enabled = ioctl_streams

    @classmethod
    async def connect(
        cls,
        target: str,
        *,
        client_id: str | None = None,
        timeout: float = 10.0,
        tls: TlsChoice = FROM_ENV,
        ioctl_streams: bool = True,
    ) -> VfioClient:
        """Connect and open the session (so this client's fds close with it).
        A TLS file that cannot be read raises grpcsvc.tls.TlsError."""
        c = cls(target, client_id=client_id, tls=tls, ioctl_streams=ioctl_streams)
        try:
            c._session = c.stub.Session(calls.SESSION_REQUEST, metadata=c._metadata)
            await asyncio.wait_for(c._session.read(), timeout)
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            await c.aclose()
            why = e.details() if isinstance(e, grpc.aio.AioRpcError) else "timed out"
            raise calls.unreachable(target, why or "") from None
        return c

    async def aclose(self) -> None:
        self._ioctls.close()
        if self._session is not None:
            self._session.cancel()
            self._session = None
        await self.channel.close(None)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None

    async def _rpc(self, call: calls.Unary[Any]) -> Any:
        try:
            return await getattr(self.stub, call.rpc)(call.request, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None

    async def _unary(self, call: calls.Unary[T]) -> T:
        """Carry out one of vfioclient.calls' unary calls (DeviceFeature,
        PrecopyInfo and CloseFd on an Ioctl stream, answered the same)."""
        try:
            if call.rpc in IOCTL_FIELDS:
                m = await self._ioctls.call(call.rpc, call.request, lambda: self._rpc(call))
            else:
                m = await self._rpc(call)
        except VfioClientError as e:
            return call.recover(e)
        return call.decode(m)

    async def ioctls(self, *seq: calls.Unary[Any]) -> list[Any]:
        """DeviceFeature and PrecopyInfo calls made one after another, as one
        thread makes them (each after the one before it ended, whatever it
        answered), in one round trip on an Ioctl lane: each one's answer as
        its own call gives it, or the VfioClientError it failed with (a
        failure does not stop the rest)."""
        if not all(c.rpc in SEQUENCE_RPCS for c in seq):
            raise ValueError("only DeviceFeature and PrecopyInfo calls go in a sequence")
        answers = await self._ioctls.sequence(
            [(c.rpc, c.request, functools.partial(self._rpc, c)) for c in seq]
        )
        out: list[Any] = []
        for c, m in zip(seq, answers, strict=True):
            try:
                out.append(c.recover(m) if isinstance(m, VfioClientError) else c.decode(m))
            except VfioClientError as e:
                out.append(e)
        return out

    # --- devices ---------------------------------------------------------------------

    async def list_devices(self) -> list[Device]:
        return await self._unary(calls.list_devices())

    async def open_device(self, name: str) -> int:
        return await self._unary(calls.open_device(name))

    async def close(self, fd: int) -> None:
        await self._unary(calls.close(fd))

    async def reset(self, fd: int) -> None:
        await self._unary(calls.reset(fd))

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
        return await self._unary(
            calls.device_feature(fd, flags, data, argsz=argsz, user_memory=user_memory)
        )

    # --- migration features ------------------------------------------------------------

    async def migration_flags(self, fd: int) -> int:
        """GET MIGRATION: the device's VFIO_MIGRATION_* flags."""
        return await self._unary(calls.migration_flags(fd))

    async def _feature_supported(self, fd: int, flags: int) -> bool:
        """A VFIO_DEVICE_FEATURE call without data: False when the kernel
        does not support it (ENOTTY, EINVAL)."""
        return await self._unary(calls.feature_supported(fd, flags))

    async def probe(self, fd: int, feature: int, ops: int = 0) -> bool:
        """PROBE a feature (with GET/SET bits in `ops`): supported or not."""
        return await self._unary(calls.probe(fd, feature, ops))

    async def dma_logging_supported(self, fd: int) -> bool:
        """PROBE DMA_LOGGING_START (QEMU's vfio_dma_logging_supported())."""
        return await self._unary(calls.dma_logging_supported(fd))

    async def enable_precopy_info_v2(self, fd: int) -> bool:
        """SET MIG_PRECOPY_INFOv2 (the REINIT opt-in); False on a kernel without it."""
        return await self._unary(calls.enable_precopy_info_v2(fd))

    async def get_state(self, fd: int) -> MigState:
        return await self._unary(calls.get_state(fd))

    async def set_state(self, fd: int, state: MigState) -> int | None:
        """SET MIG_DEVICE_STATE; the new data fd when the arc returns one."""
        return await self._unary(calls.set_state(fd, state))

    async def data_size(self, fd: int) -> int:
        """GET MIG_DATA_SIZE: the estimated STOP_COPY bytes."""
        return await self._unary(calls.data_size(fd))

    # --- data fds ----------------------------------------------------------------------

    async def read(self, fd: int, count: int, *, nonblock: bool = False) -> bytes:
        return await self._unary(calls.read(fd, count, nonblock=nonblock))

    async def read_stream(
        self, fd: int, *, chunk_size: int = 1 << 20, limit: int = 0, nonblock: bool = False
    ) -> AsyncIterator[bytes]:
        """read(2) repeatedly, server side: chunks until the end of stream (or,
        in PRE_COPY, until the data available now is sent: then ENOMSG)."""
        call = calls.read_stream_method(self.channel)(
            calls.read_stream_request(fd, chunk_size=chunk_size, limit=limit, nonblock=nonblock),
            metadata=self._metadata,
        )
        try:
            async for m in call:
                yield calls.chunk(m)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    async def write(self, fd: int, chunks: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> int:
        """write(2) each chunk in order; the total taken."""

        async def requests() -> AsyncIterator[WriteChunk]:
            if isinstance(chunks, AsyncIterable):
                async for c in chunks:
                    yield WriteChunk(fd, c)
            else:
                for r in calls.write_requests(fd, chunks):
                    yield r

        return calls.written(await self._call(self._write, requests()))

    # --- user memory: the local data path ---------------------------------------------

    async def map_user_memory(self, shm_name: str, length: int) -> int:
        """MapUserMemory: the driver maps our segment (same host); its address.
        ENOENT when the driver cannot see it (another host)."""
        return await self._unary(calls.map_user_memory(shm_name, length))

    async def unmap_user_memory(self, addr: int) -> None:
        await self._unary(calls.unmap_user_memory(addr))

    async def read_into(self, fd: int, addr: int, count: int, *, nonblock: bool = False) -> int:
        """read(fd, addr, count) into mapped user memory: the bytes read (0: end of stream)."""
        return await self._unary(calls.read_into(fd, addr, count, nonblock=nonblock))

    async def write_from(self, fd: int, addr: int, count: int) -> int:
        """write(fd, addr, count) from mapped user memory: the bytes taken."""
        return await self._unary(calls.write_from(fd, addr, count))

    def read_into_stream(self, fd: int) -> ReadIntoCall:
        """ReadIntoStream on a data fd: `submit` reads ahead, `result` takes
        their counts in order; it ends after the read that returned 0."""
        return ReadIntoCall(self.stub.ReadIntoStream(None, metadata=self._metadata), fd)

    def write_from_stream(self, fd: int) -> WriteFromCall:
        """WriteFromStream on a data fd: `submit` writes ahead, `result` takes
        their counts in order."""
        return WriteFromCall(self.stub.WriteFromStream(None, metadata=self._metadata), fd)

    async def precopy_info(self, fd: int, *, flags: int = 0, argsz: int = 24) -> PrecopyInfo:
        return await self._unary(calls.precopy_info(fd, flags=flags, argsz=argsz))

    # --- events and audit --------------------------------------------------------------

    def events(self, device: str | None = None) -> EventStream:
        """Follow a device's events (all devices' without one) until the
        server stops or the stream is closed."""
        call = self.stub.Events(calls.events_request(device), metadata=self._metadata)
        return EventStream(call)

    async def audit(self, device: str | None = None) -> AuditReport:
        """The audit's findings about a device (every device's without one)."""
        return await self._unary(calls.audit(device))


_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009  (the stubs do not declare it)


class _StreamCall:
    """A bidi call of requests answered one by one, in order."""

    def __init__(self, call: grpc.aio.StreamStreamCall[Any, Any], fd: int) -> None:
        self._call, self.fd = call, fd
        self.pending = 0  # submitted, not yet answered
        self._answered: collections.deque[Any] = collections.deque()  # a batch's later answers

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
        self.pending += 1 + len(request.then)

    async def result(self) -> int | None:
        """The next answer's count in submission order (a failed request
        raises its errno; those after it, ECANCELED); None once the call
        ended OK."""
        if self._answered:
            self.pending -= 1
            return calls.stream_count(self._answered.popleft())
        try:
            m: Any = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        if m is _EOF:
            return None
        self.pending -= 1
        self._answered.extend(m.then)
        return calls.stream_count(m)

    async def close_writing(self) -> None:
        """No more requests (the answers still come)."""
        await self._call.done_writing()

    async def finish(self) -> None:
        """End the call as the driver ends one: no more requests, the
        answers still due read (and dropped), then its status OK (a failed
        answer raises its errno)."""
        await self.close_writing()
        while await self.result() is not None:
            pass

    def cancel(self) -> None:
        self._call.cancel()


class ReadIntoCall(_StreamCall):
    async def submit(self, addr: int, count: int, *, nonblock: bool = False) -> None:
        await self._submit(calls.read_into_request(self.fd, addr, count, nonblock=nonblock))

    async def submit_many(self, spans: Sequence[tuple[int, int]]) -> None:
        """A read(2) per (addr, count), in order, in one message (at most
        calls.MAX_SPANS); `result` still takes their counts one by one."""
        if not spans:
            raise ValueError("submit_many needs at least one (addr, count)")
        await self._submit(calls.read_into_request(self.fd, *spans[0], then=spans[1:]))


class WriteFromCall(_StreamCall):
    async def submit(self, addr: int, count: int) -> None:
        await self._submit(calls.write_from_request(self.fd, addr, count))

    async def submit_many(self, spans: Sequence[tuple[int, int]]) -> None:
        """A write(2) per (addr, count), in order, in one message (at most
        calls.MAX_SPANS); `result` still takes their counts one by one."""
        if not spans:
            raise ValueError("submit_many needs at least one (addr, count)")
        await self._submit(calls.write_from_request(self.fd, *spans[0], then=spans[1:]))


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
        if not calls.subscribed(md):
            async for _ in self:  # it failed before subscribing (ENOENT): raises that
                pass
            raise calls.not_subscribed()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while True:
            try:
                m = await self._messages.__anext__()
            except grpc.aio.AioRpcError as e:
                raise _error(e) from None
            ev = calls.event(m)
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
