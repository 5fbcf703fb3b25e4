"""A small typed async client of the Vfio gRPC service, and the servers the
service tests run it against.

`VfioClient` sends `x-vfio-client` on every call, keeps a Session stream open
for as long as it lives (so the server closes its fds when it goes away) and
turns a failed call into a `VfioCallError`: an OSError whose errno is the one
in the status's ErrorInfo (domain "vfio.kernel").  A failure that carries no
such ErrorInfo is re-raised as the grpc error it is, so a test sees it.

It is not `vfioclient.VfioClient` on purpose: the service tests pin the wire
contract, which the library hides (it folds a Status into an errno, computes
argsz, drops the raw responses).  Tests of behaviour through the library use
`vfioclient` itself (see `opened`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest

import vfioclient
from driver.api import CLIENT_KEY
from driver.api.v1 import vfio_pb2 as pb
from driver.api.v1 import vfio_pb2_grpc as pbg
from driver.mlx5.cmd import MIGRATION_HEADER
from driver.registry import DeviceRegistry, Registered, pci_name
from driver.service.errnos import DOMAIN
from driver.service.server import DriverServer
from driver.vfio.uapi import (
    FEATURE_HEADER,
    MIG_STATE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_SET,
    Feature,
    MigState,
)
from fwemu.hostmem import Segment, create_segment, unlink_segment
from fwemu.link.base import FirmwareLink as Link
from fwemu.link.ifc import VfConfig
from fwemu.link.inproc import InProcessLink
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from grpcsvc.errors import ErrorInfo, error_info
from grpcsvc.options import CHANNEL_OPTIONS
from grpcsvc.spawn import FWEMU, start, stop
from grpcsvc.tls import ClientTls, aio_channel
from tests.support import harness_link, tls_mode

T = TypeVar("T")

GET = VFIO_DEVICE_FEATURE_GET
SET = VFIO_DEVICE_FEATURE_SET
MIG_STATE_ARGSZ = FEATURE_HEADER.size + MIG_STATE.size  # 16

# grpcsvc.spawn's arguments for a quiet service on a free loopback port.
LOCAL = ["--listen", "127.0.0.1:0", "--log-level", "warning"]


class VfioCallError(OSError):
    """A failed Vfio call: `errno` from the ErrorInfo, `info` the whole of it."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(int(info.metadata["errno"]), info.message)
        self.info = info

    @property
    def code(self) -> grpc.StatusCode:
        return self.info.code

    @property
    def written(self) -> int:
        """Write: the bytes earlier write calls of the stream took."""
        return int(self.info.metadata["written"])


def _converted(err: grpc.aio.AioRpcError) -> Exception:
    info = error_info(err)
    if info.domain == DOMAIN and "errno" in info.metadata:
        return VfioCallError(info)
    return err


@dataclass
class FeatureResult:
    data: bytes
    user_memory: dict[int, bytes] = field(default_factory=dict)
    data_fd: int = -1


# A client's TLS when none is given: the harness's (tls_mode.client_tls).
HARNESS: Any = object()


class VfioClient:
    """One client of a driver server (one descriptor table).  `tls`: what it
    presents (None: plaintext); by default the admin's certificate towards a
    server the harness serves with mutual TLS (tls_mode), else plaintext."""

    def __init__(
        self, target: str, client_id: str | None = None, *, tls: ClientTls | None = HARNESS
    ) -> None:
        self.target = target
        self.client_id = client_id or f"test-{secrets.token_hex(6)}"
        self.metadata = ((CLIENT_KEY, self.client_id),)
        self.tls = tls_mode.client_tls(target) if tls is HARNESS else tls
        self.channel = aio_channel(target, self.tls, options=CHANNEL_OPTIONS)
        self.stub = pbg.VfioStub(self.channel)
        self.session: Any = None  # the Session call, while open

    @classmethod
    async def connect(
        cls,
        target: str,
        client_id: str | None = None,
        *,
        session: bool = True,
        tls: ClientTls | None = HARNESS,
    ) -> VfioClient:
        client = cls(target, client_id, tls=tls)
        if session:
            try:
                await client.open_session()
            except BaseException:
                await client.channel.close(None)
                raise
        return client

    async def open_session(self) -> str:
        """Start the Session stream; returns the client id the server names it by."""
        self.session = self.stub.Session(pb.SessionRequest(), metadata=self.metadata)
        event = await asyncio.wait_for(self.session.read(), 10)
        assert isinstance(event, pb.SessionEvent), event
        return event.client

    async def end_session(self) -> None:
        if self.session is not None:
            self.session.cancel()
            self.session = None

    async def close_channel(self) -> None:
        """Go away as a process exits: the session ends with the channel."""
        self.session = None
        await self.channel.close(None)

    async def __aenter__(self) -> VfioClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close_channel()

    async def _call(self, fn: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await fn(request, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise _converted(e) from None

    # --- devices ---------------------------------------------------------------------

    async def list_devices(self) -> list[pb.DeviceInfo]:
        r = await self._call(self.stub.ListDevices, pb.ListDevicesRequest())
        return list(r.devices)

    async def device_info(self, name: str) -> pb.DeviceInfo:
        (info,) = [d for d in await self.list_devices() if d.name == name]
        return info

    async def open_device(self, name: str) -> int:
        r = await self._call(self.stub.OpenDevice, pb.OpenDeviceRequest(name=name))
        return r.fd

    async def close(self, fd: int) -> None:
        await self._call(self.stub.CloseFd, pb.CloseFdRequest(fd=fd))

    async def device_feature(
        self,
        fd: int,
        argsz: int,
        flags: int,
        data: bytes = b"",
        user_memory: Mapping[int, bytes] | None = None,
    ) -> FeatureResult:
        req = pb.DeviceFeatureRequest(
            fd=fd,
            argsz=argsz,
            flags=flags,
            data=data,
            user_memory=[pb.UserBuffer(addr=a, data=d) for a, d in (user_memory or {}).items()],
        )
        r = await self._call(self.stub.DeviceFeature, req)
        return FeatureResult(r.data, {b.addr: b.data for b in r.user_memory}, r.data_fd)

    async def set_state(self, fd: int, state: MigState) -> int:
        """MIG_DEVICE_STATE SET; returns data_fd (-1 when the arc opened no file)."""
        r = await self.device_feature(
            fd, MIG_STATE_ARGSZ, SET | Feature.MIG_DEVICE_STATE, MIG_STATE.pack(state, 0)
        )
        device_state, data_fd = MIG_STATE.unpack(r.data)
        assert device_state == state and data_fd == r.data_fd, (device_state, data_fd, r)
        return data_fd

    async def get_state(self, fd: int) -> MigState:
        r = await self.device_feature(
            fd, MIG_STATE_ARGSZ, GET | Feature.MIG_DEVICE_STATE, MIG_STATE.pack(0, 0)
        )
        return MigState(MIG_STATE.unpack(r.data)[0])

    async def reset(self, fd: int) -> None:
        await self._call(self.stub.DeviceReset, pb.DeviceResetRequest(fd=fd))

    # --- data fds ------------------------------------------------------------------------

    async def read(self, fd: int, count: int, *, nonblock: bool = False) -> bytes:
        r = await self._call(self.stub.Read, pb.ReadRequest(fd=fd, count=count, nonblock=nonblock))
        return r.data

    async def read_stream(
        self, fd: int, *, chunk_size: int = 0, limit: int = 0, nonblock: bool = False
    ) -> AsyncIterator[bytes]:
        """Each message's data; a failure that ends the stream is raised after them."""
        req = pb.ReadStreamRequest(fd=fd, chunk_size=chunk_size, limit=limit, nonblock=nonblock)
        call = self.stub.ReadStream(req, metadata=self.metadata)
        try:
            async for msg in call:
                yield msg.data
        except grpc.aio.AioRpcError as e:
            raise _converted(e) from None
        finally:
            call.cancel()

    async def read_all(
        self, fd: int, *, chunk_size: int = 0, limit: int = 0, nonblock: bool = False
    ) -> tuple[list[bytes], VfioCallError | None]:
        """ReadStream to its end: the messages, and the error it ended with (None: OK)."""
        chunks: list[bytes] = []
        try:
            async for data in self.read_stream(
                fd, chunk_size=chunk_size, limit=limit, nonblock=nonblock
            ):
                chunks.append(data)
        except VfioCallError as e:
            return chunks, e
        return chunks, None

    async def write(self, fd: int, chunks: Iterable[bytes | bytearray]) -> int:
        """One Write stream, one write(2) per chunk; the total taken."""

        async def requests() -> AsyncIterator[pb.WriteRequest]:
            for data in chunks:
                yield pb.WriteRequest(fd=fd, data=bytes(data))  # protobuf refuses bytearray

        r = await self._call(self.stub.Write, requests())
        return r.written

    async def precopy_info(
        self, fd: int, *, argsz: int = 24, flags: int = 0, initial: int = 0, dirty: int = 0
    ) -> pb.PrecopyInfoResponse:
        req = pb.PrecopyInfoRequest(
            fd=fd, argsz=argsz, flags=flags, initial_bytes=initial, dirty_bytes=dirty
        )
        return await self._call(self.stub.PrecopyInfo, req)


def parse_records(stream: bytes) -> list[tuple[int, int, int]]:
    """(record_size, flags, tag) of each record; the stream must end on a record end."""
    records, pos = [], 0
    while pos < len(stream):
        size, flags, tag = MIGRATION_HEADER.unpack_from(stream, pos)
        records.append((size, flags, tag))
        pos += MIGRATION_HEADER.size + size
    assert pos == len(stream), "a record runs past the end of the stream"
    return records


# --- servers ----------------------------------------------------------------------------


# A firmware command that does not answer fails well before the test's timeout.
CMD_TIMEOUT = 5.0

# Small, quiet VFs keep the tests fast; tests that need a workload say so.
SMALL_VF: dict[str, Any] = {"size": 256 * 1024, "dirty_bytes_per_s": 0}


@dataclass
class Vf:
    name: str  # the VFIO device's name (PCI address)
    vhca_id: int


@dataclass
class DriverUnderTest:
    """A DriverServer in the test's event loop over a firmware link: an
    in-process model, or a `fwemu serve` process through GrpcLink.  The link's
    scenario side makes VFs, reconfigures them and reads digests."""

    link: Link
    server: DriverServer
    target: str
    kind: str

    @classmethod
    async def start(cls, link: Link, kind: str) -> DriverUnderTest:
        """Served in this run's mode (tls_mode: mutual TLS in the mTLS pass)."""
        server = DriverServer(DeviceRegistry(link, cmd_timeout=CMD_TIMEOUT), roles=tls_mode.roles())
        try:
            target = await tls_mode.start(server)
        except BaseException:
            await link.close()
            raise
        return cls(link, server, target, kind)

    async def stop(self) -> None:
        tls_mode.stopped(self.target)
        await self.server.stop(0)
        await self.link.close()

    async def create_vfs(self, count: int = 1, **config: Any) -> list[Vf]:
        vfs = await self.link.create_vfs(count, VfConfig(**{**SMALL_VF, **config}))
        await self.server.registry.refresh()  # probed now, as ListDevices would
        return [Vf(pci_name(v.function_id), v.vhca_id) for v in vfs]

    async def open_vf(self, client: VfioClient) -> tuple[Vf, int]:
        """One new VF (the small default), opened by `client`: (vf, its fd)."""
        (vf,) = await self.create_vfs()
        return vf, await client.open_device(vf.name)

    def registered(self, vf: Vf) -> Registered:
        """The driver's own objects behind a device (in-process checks)."""
        return self.server.registry.devices[vf.name]


@pytest.fixture(scope="module", name="fwemu_target")
def fwemu_target_fixture() -> Iterator[str]:
    """One `fwemu serve` process per test module (each test makes its own VFs),
    in this run's mode (tls_mode)."""
    proc, target = start([*FWEMU, *LOCAL, "--vfs", "0", *tls_mode.server_args()], "fwemu")
    yield tls_mode.serving(target)
    tls_mode.stopped(target)
    stop(proc)


@pytest.fixture(params=["inproc", "fwemu"], name="drv")
async def drv_fixture(request: pytest.FixtureRequest) -> AsyncIterator[DriverUnderTest]:
    """The driver service in this process, over an in-process firmware or over
    a `fwemu serve` process (GrpcLink)."""
    link: Link
    if request.param == "inproc":
        link = InProcessLink(Firmware(LoopClock(), seed=7))
    else:
        link = await harness_link.connect_link(request.getfixturevalue("fwemu_target"))
    d = await DriverUnderTest.start(link, request.param)
    yield d
    await d.stop()


@pytest.fixture(name="inproc")
async def inproc_fixture() -> AsyncIterator[DriverUnderTest]:
    """The driver service over an in-process firmware only (tests that look
    inside the driver or the firmware)."""
    d = await DriverUnderTest.start(InProcessLink(Firmware(LoopClock(), seed=7)), "inproc")
    yield d
    await d.stop()


@pytest.fixture(name="client")
async def client_fixture(drv: DriverUnderTest) -> AsyncIterator[VfioClient]:
    """A client of `drv` with its Session open."""
    c = await VfioClient.connect(drv.target)
    yield c
    await c.close_channel()


async def errno_of(call: Awaitable[object]) -> int:
    """The call fails with a VfioCallError: its errno."""
    with pytest.raises(VfioCallError) as info:
        await call
    return info.value.errno


@contextlib.contextmanager
def shm_segment(size: int, prefix: str) -> Iterator[Segment]:
    """A client's shared memory segment, unlinked and closed afterwards."""
    seg = create_segment(size, prefix=prefix)
    try:
        yield seg
    finally:
        unlink_segment(seg.name)
        seg.close()


async def opened(c: vfioclient.VfioClient, fd: int, state: MigState) -> int:
    """SET a state whose arc opens a data fd (with the client library): that fd."""
    data_fd = await c.set_state(fd, state)
    assert data_fd is not None
    return data_fd


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> bool:
    """Poll `check` until it holds or `timeout` passes; its last answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await check():
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
