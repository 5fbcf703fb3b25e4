"""The vfio.v1 calls of a client, as values, with no I/O.

Each method of the clients is one of these: a unary RPC is a `Unary`, the
RPC's name in the stub, the request to send, `decode` for its answer and
`recover` for its failure (most re-raise; a PROBE's ENOTTY is an answer,
False); the streams have their requests and per-message decoders here.  The
asyncio client (client.py, grpc.aio) and the blocking one (sync.py, grpc's
synchronous stack) only carry these over their channel, so the two speak
the protocol alike by construction: requests, struct packing, errors.

A failed call is a VfioClientError, an OSError whose errno is the kernel's,
read from the google.rpc.ErrorInfo in the call's `grpc-status-details-bin`
trailer (vfio.proto, "Errors").
"""

from __future__ import annotations

import errno
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Generic, NoReturn, TypeVar, cast

import grpc

from driver.api import CLIENT_KEY
from driver.api.events import PAYLOADS, Event, Finding, Payload
from driver.api.v1 import vfio_pb2 as pb
from driver.api.wire import WriteChunk, decode_read_response, encode_write_request
from grpcsvc.errnames import errno_name
from grpcsvc.errors import error_info

from .uapi import (
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

T = TypeVar("T")
U = TypeVar("U")
Metadata = tuple[tuple[str, str], ...]

EVENTS_KEY = "x-vfio-events"  # the Events stream's initial metadata once subscribed
FEATURE_HEADER_SIZE = 8
WRITE_METHOD = "/vfio.v1.Vfio/Write"
SESSION = "Session"
SESSION_REQUEST = pb.SessionRequest()


# --- errors --------------------------------------------------------------------------


class VfioClientError(OSError):
    """A failed call: `errno` is the kernel's errno (ENOMSG, EINVAL, ...)."""

    def __init__(self, code: int, message: str, grpc_code: grpc.StatusCode | None = None) -> None:
        super().__init__(code, message)
        self.grpc_code = grpc_code

    @property
    def name(self) -> str:
        return errno_name(self.errno or 0)


def rpc_error(e: grpc.RpcError) -> VfioClientError:
    """The VfioClientError of a failed call (grpc.aio's or the sync stack's:
    both are a grpc.Call with its trailers): the ErrorInfo's errno, else
    ENOTCONN for a driver out of reach, else EIO."""
    call = cast(grpc.Call, e)
    info = error_info(cast(grpc.aio.AioRpcError, call))
    code = info.metadata.get("errno")
    if code is not None and code.isdigit():
        return VfioClientError(int(code), info.message, info.code)
    status = call.code()
    if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return VfioClientError(errno.ENOTCONN, f"driver unreachable: {call.details()}", status)
    return VfioClientError(errno.EIO, f"{status.name}: {call.details()}", status)


def unreachable(target: str, why: str) -> VfioClientError:
    """What connect raises when the session cannot be opened."""
    return VfioClientError(errno.ENOTCONN, f"cannot reach the vfio-driver at {target}: {why}")


def closed() -> VfioClientError:
    return VfioClientError(errno.EBADF, "the client is closed")


def _reraise(e: VfioClientError) -> NoReturn:
    raise e from None


# --- the caller ----------------------------------------------------------------------


def new_client_id() -> str:
    return f"vfioclient-{secrets.token_hex(6)}"


def client_metadata(client_id: str) -> Metadata:
    """Every call names its client: its Session's owner, its fd table."""
    return ((CLIENT_KEY, client_id),)


# --- answers -------------------------------------------------------------------------


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


@dataclass(frozen=True)
class AuditReport:
    findings: list[Finding]  # oldest first (the newest few hundred per device)
    counts: dict[str, int]  # findings by rule id, all of them


def _payload(cls: type[Payload], m: Any) -> Any:
    return cls(**{f.name: getattr(m, f.name) for f in fields(cls)})


def event(m: pb.Event) -> Event | None:
    """An Events message as a driver.api.events.Event; None for a kind this
    client does not know (a newer server's)."""
    kind = m.WhichOneof("kind")
    if kind is None or kind not in PAYLOADS:
        return None
    payload = _payload(PAYLOADS[kind], getattr(m, kind))
    return Event(m.time, m.device, payload, m.client, m.data_fd, m.stream)


def subscribed(initial_metadata: Iterable[tuple[str, Any]] | None) -> bool:
    """Whether an Events call's initial metadata says it is live."""
    return any(k == EVENTS_KEY for k, _ in initial_metadata or ())


def not_subscribed() -> VfioClientError:
    """An Events call that ended before subscribing, without an errno."""
    return VfioClientError(errno.EIO, "the Events stream ended before subscribing")


# --- unary calls ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unary(Generic[T]):
    """One unary RPC: `rpc` (the stub's method name) with `request`; its
    answer read by `decode`, its failure by `recover` (raise, or an answer)."""

    rpc: str
    request: Any
    decode: Callable[[Any], T]
    recover: Callable[[VfioClientError], T] = _reraise

    def then(self, f: Callable[[T], U]) -> Unary[U]:
        """The same call, its answer read on by `f`."""
        decode = self.decode
        return Unary(self.rpc, self.request, lambda m: f(decode(m)))

    def recovering(self, recover: Callable[[VfioClientError], T]) -> Unary[T]:
        return replace(self, recover=recover)


def _nothing(_: Any) -> None:
    return None


def list_devices() -> Unary[list[Device]]:
    """The VFs the driver has bound."""
    return Unary(
        "ListDevices",
        pb.ListDevicesRequest(),
        lambda m: [
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
        ],
    )


def open_device(name: str) -> Unary[int]:
    """open(2) of a VF's VFIO device: its fd."""
    return Unary("OpenDevice", pb.OpenDeviceRequest(name=name), lambda m: int(m.fd))


def close(fd: int) -> Unary[None]:
    """close(2) of a device fd or a data fd."""
    return Unary("CloseFd", pb.CloseFdRequest(fd=fd), _nothing)


def reset(fd: int) -> Unary[None]:
    """VFIO_DEVICE_RESET: back to RUNNING, data fds ended."""
    return Unary("DeviceReset", pb.DeviceResetRequest(fd=fd), _nothing)


def device_feature(
    fd: int,
    flags: int,
    data: bytes = b"",
    *,
    argsz: int | None = None,
    user_memory: Mapping[int, bytes] | None = None,
) -> Unary[FeatureResult]:
    """VFIO_DEVICE_FEATURE: argsz defaults to the header plus `data`."""
    req = pb.DeviceFeatureRequest(
        fd=fd,
        argsz=FEATURE_HEADER_SIZE + len(data) if argsz is None else argsz,
        flags=flags,
        data=data,
        user_memory=[pb.UserBuffer(addr=a, data=b) for a, b in (user_memory or {}).items()],
    )
    return Unary(
        "DeviceFeature",
        req,
        lambda m: FeatureResult(m.data, {b.addr: b.data for b in m.user_memory}, m.data_fd),
    )


# --- migration features ------------------------------------------------------------


def migration_flags(fd: int) -> Unary[int]:
    """GET MIGRATION: the device's VFIO_MIGRATION_* flags."""
    return device_feature(
        fd, Feature.MIGRATION | VFIO_DEVICE_FEATURE_GET, bytes(MIGRATION.size)
    ).then(lambda r: int(MIGRATION.unpack_from(r.data)[0]))


def _unsupported(e: VfioClientError) -> bool:
    if e.errno in (errno.ENOTTY, errno.EINVAL):
        return False
    raise e from None


def feature_supported(fd: int, flags: int) -> Unary[bool]:
    """A VFIO_DEVICE_FEATURE call without data: False when the kernel
    does not support it (ENOTTY, EINVAL)."""
    return device_feature(fd, flags).then(lambda _: True).recovering(_unsupported)


def probe(fd: int, feature: int, ops: int = 0) -> Unary[bool]:
    """PROBE a feature (with GET/SET bits in `ops`): supported or not."""
    return feature_supported(fd, feature | VFIO_DEVICE_FEATURE_PROBE | ops)


def dma_logging_supported(fd: int) -> Unary[bool]:
    """PROBE DMA_LOGGING_START (QEMU's vfio_dma_logging_supported())."""
    return probe(fd, Feature.DMA_LOGGING_START, VFIO_DEVICE_FEATURE_SET)


def enable_precopy_info_v2(fd: int) -> Unary[bool]:
    """SET MIG_PRECOPY_INFOv2 (the REINIT opt-in); False on a kernel without it."""
    return feature_supported(fd, Feature.MIG_PRECOPY_INFOv2 | VFIO_DEVICE_FEATURE_SET)


def get_state(fd: int) -> Unary[MigState]:
    """GET MIG_DEVICE_STATE: the device's state now."""
    return device_feature(
        fd, Feature.MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_GET, bytes(MIG_STATE.size)
    ).then(lambda r: MigState(MIG_STATE.unpack_from(r.data)[0]))


def _opened_fd(r: FeatureResult) -> int | None:
    data_fd = MIG_STATE.unpack_from(r.data)[1]
    return None if data_fd < 0 else int(data_fd)


def set_state(fd: int, state: MigState) -> Unary[int | None]:
    """SET MIG_DEVICE_STATE; the new data fd when the arc returns one."""
    return device_feature(
        fd, Feature.MIG_DEVICE_STATE | VFIO_DEVICE_FEATURE_SET, MIG_STATE.pack(state, -1)
    ).then(_opened_fd)


def data_size(fd: int) -> Unary[int]:
    """GET MIG_DATA_SIZE: the estimated STOP_COPY bytes."""
    return device_feature(
        fd, Feature.MIG_DATA_SIZE | VFIO_DEVICE_FEATURE_GET, bytes(MIG_DATA_SIZE.size)
    ).then(lambda r: int(MIG_DATA_SIZE.unpack_from(r.data)[0]))


# --- data fds ------------------------------------------------------------------------


def read(fd: int, count: int, *, nonblock: bool = False) -> Unary[bytes]:
    """One read(2) of a saving data fd (b"": the end of the stream)."""
    return Unary(
        "Read", pb.ReadRequest(fd=fd, count=count, nonblock=nonblock), lambda m: bytes(m.data)
    )


def precopy_info(fd: int, *, flags: int = 0, argsz: int = 24) -> Unary[PrecopyInfo]:
    """VFIO_MIG_GET_PRECOPY_INFO on a saving data fd in PRE_COPY."""
    return Unary(
        "PrecopyInfo",
        pb.PrecopyInfoRequest(fd=fd, argsz=argsz, flags=flags),
        lambda m: PrecopyInfo(m.argsz, m.flags, m.initial_bytes, m.dirty_bytes),
    )


def read_stream_request(
    fd: int, *, chunk_size: int = 1 << 20, limit: int = 0, nonblock: bool = False
) -> pb.ReadStreamRequest:
    """ReadStream: read(2) repeatedly, server side, each result a message."""
    return pb.ReadStreamRequest(fd=fd, chunk_size=chunk_size, limit=limit, nonblock=nonblock)


READ_STREAM_METHOD = "/vfio.v1.Vfio/ReadStream"


def read_stream_method(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """The ReadStream multicallable of `channel`, its answers left on the
    wire for `chunk`: the data in one copy (driver/api/wire.py), where the
    generated stub's protobuf parse and `.data` cost half the client's CPU of
    a stop-copy stream."""
    return channel.unary_stream(
        READ_STREAM_METHOD,
        request_serializer=pb.ReadStreamRequest.SerializeToString,
        response_deserializer=None,
    )


def chunk(m: pb.ReadResponse | bytes) -> bytes:
    """A ReadResponse's data: of the generated message, or of one still on
    the wire (read_stream_method's)."""
    if isinstance(m, bytes):
        return decode_read_response(m)
    return m.data


def write_method(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """The Write multicallable of `channel`: its requests are encoded with one
    copy of the data (driver/api/wire.py)."""
    return channel.stream_unary(
        WRITE_METHOD,
        request_serializer=encode_write_request,
        response_deserializer=pb.WriteResponse.FromString,
    )


def write_requests(fd: int, chunks: bytes | Iterable[bytes]) -> Iterator[WriteChunk]:
    """Write's requests: one write(2) per chunk (`chunks` itself if bytes)."""
    if isinstance(chunks, bytes | bytearray | memoryview):
        yield WriteChunk(fd, chunks)
    else:
        for c in chunks:
            yield WriteChunk(fd, c)


def written(m: pb.WriteResponse) -> int:
    return int(m.written)


# --- user memory: the local data path ----------------------------------------------


def map_user_memory(shm_name: str, length: int) -> Unary[int]:
    """MapUserMemory: the driver maps our segment (same host); its address.
    ENOENT when the driver cannot see it (another host)."""
    return Unary(
        "MapUserMemory",
        pb.MapUserMemoryRequest(shm_name=shm_name, length=length),
        lambda m: int(m.addr),
    )


def unmap_user_memory(addr: int) -> Unary[None]:
    """UnmapUserMemory of an address MapUserMemory returned."""
    return Unary("UnmapUserMemory", pb.UnmapUserMemoryRequest(addr=addr), _nothing)


MAX_SPANS = 64  # operations one ReadIntoStream / WriteFromStream request may carry


def _spans(then: Sequence[tuple[int, int]]) -> list[pb.Span]:
    if len(then) >= MAX_SPANS:
        raise ValueError(f"{len(then) + 1} operations in one request: at most {MAX_SPANS}")
    return [pb.Span(addr=a, count=n) for a, n in then]


def read_into_request(
    fd: int, addr: int, count: int, *, nonblock: bool = False, then: Sequence[tuple[int, int]] = ()
) -> pb.ReadIntoRequest:
    return pb.ReadIntoRequest(fd=fd, addr=addr, count=count, nonblock=nonblock, then=_spans(then))


def write_from_request(
    fd: int, addr: int, count: int, *, then: Sequence[tuple[int, int]] = ()
) -> pb.WriteFromRequest:
    return pb.WriteFromRequest(fd=fd, addr=addr, count=count, then=_spans(then))


def _count(m: Any) -> int:
    return int(m.count)


def read_into(fd: int, addr: int, count: int, *, nonblock: bool = False) -> Unary[int]:
    """read(fd, addr, count) into mapped user memory: the bytes read (0: end of stream)."""
    return Unary("ReadInto", read_into_request(fd, addr, count, nonblock=nonblock), _count)


def write_from(fd: int, addr: int, count: int) -> Unary[int]:
    """write(fd, addr, count) from mapped user memory: the bytes taken."""
    return Unary("WriteFrom", write_from_request(fd, addr, count), _count)


def stream_count(m: pb.ReadIntoResponse | pb.WriteFromResponse) -> int:
    """An answer of ReadIntoStream or WriteFromStream: its count, or its
    in-band errno raised."""
    if m.errno:
        raise VfioClientError(m.errno, m.message)
    return int(m.count)


# --- events and audit ----------------------------------------------------------------


def events_request(device: str | None = None) -> pb.EventsRequest:
    """Follow one device's events, or every device's without one."""
    return pb.EventsRequest(device=device or "")


def audit(device: str | None = None) -> Unary[AuditReport]:
    """The audit's findings about a device (every device's without one)."""
    return Unary(
        "Audit",
        pb.AuditRequest(device=device or ""),
        lambda m: AuditReport([_payload(Finding, f) for f in m.findings], dict(m.counts)),
    )
