"""What the hostile-client tests run against: a `fwemu serve` process and a
`vfio-driver serve --firmware` process over it, as a lab deploys them, with
mutual TLS (one pair for the whole package) or in plaintext on loopback (the
symlink cases run there too), and the parties that call them: the victim
(TENANTS[0], "team-a"), the attacker (TENANTS[1], "team-b"), the admin, and
the drivers.

The victim migrates the way an orchestrator does (`Victim`: open source and
destination, PRE_COPY, drain, STOP_COPY, resume, compare the firmware's
digests), around or during each attack, so every test shows both halves of
the boundary: the attack is refused, and the victim never notices it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.service.errnos import DOMAIN as VFIO_DOMAIN
from driver.service.servicer import EVENTS_KEY
from driver.shards import pci_name
from driver.vfio.uapi import MigState
from fwemu.api.v1 import firmware_pb2_grpc as fgrpc
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import VfConfig
from fwemu.service.servicers import DOMAIN as FWEMU_DOMAIN
from grpcsvc.errors import ErrorInfo, error_info
from grpcsvc.options import CHANNEL_OPTIONS
from grpcsvc.spawn import DRIVER as DRIVER_SERVE
from grpcsvc.spawn import FWEMU, start, stop
from grpcsvc.tls import ClientTls, aio_channel
from tests.support.driver_service import Vf, VfioCallError, VfioClient
from tests.support.tls import ADMIN as ADMIN
from tests.support.tls import DRIVER as DRIVER
from tests.support.tls import OTHER_DRIVER as OTHER_DRIVER
from tests.support.tls import TENANTS, Pki

S = MigState
VICTIM, ATTACKER = TENANTS
LOCAL = ("--listen", "127.0.0.1:0", "--log-level", "error", "--loop", "asyncio")
# Small VFs without a workload: a stopped source's state is what it had, so
# the destination's digest must equal it.
VF = VfConfig(size=256 * 1024, dirty_bytes_per_s=0)


@dataclass(frozen=True)
class Stack:
    """A firmware process and a driver process over it."""

    kind: str  # "mtls" or "plaintext"
    firmware: str  # fwemu serve: the Firmware and Scenario services
    driver: str  # vfio-driver serve --firmware
    shm_dir: Path  # the driver's --shm-dir: where MapUserMemory opens segments
    pki: Pki | None  # None: plaintext, every caller the principal `anonymous`

    def tls(self, who: str) -> ClientTls | None:
        return self.pki.client_tls(who) if self.pki is not None else None


@contextlib.contextmanager
def stack(kind: str, pki: Pki, shm_dir: Path) -> Iterator[Stack]:
    """`fwemu serve` and `vfio-driver serve --firmware` on loopback.  With
    mutual TLS both take the PKI's roles (lab-admin administers); the firmware
    knows two drivers (ours and OTHER_DRIVER, another lab's on the same
    firmware) and ours presents DRIVER's certificate.  Each must exit 0,
    without a traceback, at the end: no attack may crash a service."""
    secure = kind == "mtls"
    tls = pki.server_args() if secure else []
    drivers = ["--driver-principals", f"{DRIVER},{OTHER_DRIVER}"] if secure else []
    link = pki.client_args(DRIVER, prefix="firmware-tls") if secure else []
    fw_proc, fw = start([*FWEMU, *LOCAL, "--vfs", "0", *tls, *drivers], "fwemu")
    try:
        argv = [*DRIVER_SERVE, *LOCAL, "--firmware", fw, "--shm-dir", str(shm_dir)]
        drv_proc, drv = start([*argv, "--cmd-timeout", "10", *tls, *link], "vfio-driver")
        try:
            yield Stack(kind, fw, drv, shm_dir, pki if secure else None)
        finally:
            rc, err = stop(drv_proc)
            assert rc == 0 and "Traceback" not in err, err
    finally:
        rc, err = stop(fw_proc)
        assert rc == 0 and "Traceback" not in err, err


class Parties:
    """The clients of one test, by principal name (ADMIN, the TENANTS, the
    drivers); all closed at its end.  In plaintext every name is the one
    principal `anonymous`."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self._clients: list[VfioClient] = []
        self._links: dict[str, GrpcLink] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._admin: VfioClient | None = None

    async def vfio(
        self, who: str, client_id: str | None = None, *, session: bool = True
    ) -> VfioClient:
        """A client of the driver (a process of `who`; `client_id` its
        x-vfio-client), with its Session open unless `session` is False."""
        c = await VfioClient.connect(
            self.stack.driver, client_id, session=session, tls=self.stack.tls(who)
        )
        self._clients.append(c)
        return c

    def _channel(self, who: str) -> grpc.aio.Channel:
        ch = aio_channel(self.stack.firmware, self.stack.tls(who), options=CHANNEL_OPTIONS)
        self._channels.append(ch)
        return ch

    def firmware(self, who: str) -> fgrpc.FirmwareStub:
        """fwemu's Firmware service, called as `who`."""
        return fgrpc.FirmwareStub(self._channel(who))

    def scenario(self, who: str) -> sgrpc.ScenarioStub:
        """fwemu's Scenario service, called as `who`."""
        return sgrpc.ScenarioStub(self._channel(who))

    def link(self, who: str) -> GrpcLink:
        """fwemu's Scenario service as the library sees it (no completion
        stream), as `who`."""
        if who not in self._links:
            self._links[who] = GrpcLink(self.stack.firmware, tls=self.stack.tls(who))
        return self._links[who]

    async def vfs(self, count: int, config: VfConfig = VF) -> list[Vf]:
        """New VFs (the admin makes them), probed by the driver."""
        infos = await self.link(ADMIN).create_vfs(count, config)
        if self._admin is None:
            self._admin = await self.vfio(ADMIN, session=False)
        await self._admin.list_devices()  # ListDevices probes new VFs
        return [Vf(pci_name(i.function_id), i.vhca_id) for i in infos]

    async def digest(self, who: str, vf: Vf) -> str:
        return await self.link(who).digest(vf.vhca_id)

    async def close(self) -> None:
        for c in self._clients:
            await c.close_channel()
        for link in self._links.values():
            await link.close()
        for ch in self._channels:
            await ch.close(None)


@contextlib.asynccontextmanager
async def parties(stack: Stack) -> AsyncIterator[Parties]:
    p = Parties(stack)
    try:
        yield p
    finally:
        await p.close()


@dataclass
class Victim:
    """A migration by one client, from `src` to `dst`, in steps an attack can
    come between: started (both devices open, the source in PRE_COPY with
    what it had read so far loaded into the destination in RESUMING), drained
    again, finished (STOP_COPY to the end, both STOP, equal digests)."""

    parties: Parties
    client: VfioClient
    src: Vf
    dst: Vf
    sfd: int
    dfd: int
    saving: int
    resuming: int
    memory: tuple[int, int] | None = None  # (addr, length) of a mapped segment
    moved: int = 0
    digests: tuple[str, str] | None = field(default=None)

    @classmethod
    async def start(
        cls,
        parties: Parties,
        client: VfioClient,
        vfs: list[Vf] | None = None,
        *,
        memory: tuple[int, int] | None = None,
    ) -> Victim:
        """Open two new VFs (or `vfs`), start pre-copy and load what it
        gives; through user memory (ReadInto / WriteFrom at `memory`, a
        mapping of the client's) when it is given, else Read / Write."""
        src, dst = vfs or await parties.vfs(2)
        sfd = await client.open_device(src.name)
        dfd = await client.open_device(dst.name)
        saving = await client.set_state(sfd, S.PRE_COPY)
        await client.set_state(dfd, S.STOP)
        resuming = await client.set_state(dfd, S.RESUMING)
        v = cls(parties, client, src, dst, sfd, dfd, saving, resuming, memory)
        await v.drain()
        assert v.moved > 0, "pre-copy gave nothing to move"
        return v

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.sfd, self.dfd, self.saving, self.resuming)

    @property
    def devices(self) -> frozenset[str]:
        return frozenset({self.src.name, self.dst.name})

    async def _load(self, chunks: list[bytes]) -> None:
        data = b"".join(chunks)
        if data:
            assert await self.client.write(self.resuming, [data]) == len(data)
            self.moved += len(data)

    async def _move(self) -> VfioCallError | None:
        """Move what the saving fd gives until it ends (None) or fails."""
        if self.memory is None:
            chunks, err = await self.client.read_all(self.saving)
            await self._load(chunks)
            return err
        addr, length = self.memory
        while True:
            try:
                n = await read_into(self.client, self.saving, addr, length)
            except VfioCallError as e:
                return e
            if n == 0:
                return None
            assert await write_from(self.client, self.resuming, addr, n) == n
            self.moved += n

    async def drain(self) -> None:
        """Read what pre-copy has now (to ENOMSG) and load it."""
        err = await self._move()
        assert err is not None and err.errno == errno.ENOMSG, err

    async def stop_copy(self) -> None:
        """STOP_COPY, the stream read to its end and loaded."""
        assert await self.client.set_state(self.sfd, S.STOP_COPY) == -1  # the fd continues
        err = await self._move()
        assert err is None, err

    async def complete(self) -> tuple[str, str]:
        """Both STOP: the digests (read with the victim's own holder access,
        and the admin's) are equal.  Then every fd is closed."""
        c, p = self.client, self.parties
        assert await c.set_state(self.sfd, S.STOP) == -1
        assert await c.set_state(self.dfd, S.STOP) == -1  # every image loaded
        mine = (await p.digest(VICTIM, self.src), await p.digest(VICTIM, self.dst))
        admins = (await p.digest(ADMIN, self.src), await p.digest(ADMIN, self.dst))
        assert mine[0] == mine[1], "the destination's state differs from the source's"
        assert admins == mine
        for fd in (self.saving, self.resuming, self.sfd, self.dfd):
            await c.close(fd)
        self.digests = mine
        return mine

    async def finish(self) -> tuple[str, str]:
        await self.stop_copy()
        return await self.complete()

    async def under_attack(self, attack: Callable[[], Awaitable[int]], at_least: int) -> int:
        """Drain and stop-copy while `attack` runs round after round (each
        returning how many attempts it made), until the migration has moved
        on and at least `at_least` attempts were made; then complete.  The
        attempts made."""
        migrating = True
        attempts = 0

        async def attacking() -> None:
            nonlocal attempts
            while migrating or attempts < at_least:
                attempts += await attack()

        async def migrating_() -> None:
            nonlocal migrating
            await self.drain()
            await self.stop_copy()
            migrating = False

        await asyncio.gather(attacking(), migrating_())
        await self.complete()
        return attempts


async def map_user_memory(client: VfioClient, name: str, length: int) -> int:
    r = await client._call(
        client.stub.MapUserMemory, pb.MapUserMemoryRequest(shm_name=name, length=length)
    )
    return int(r.addr)


async def read_into(client: VfioClient, fd: int, addr: int, count: int) -> int:
    r = await client._call(client.stub.ReadInto, pb.ReadIntoRequest(fd=fd, addr=addr, count=count))
    return int(r.count)


async def write_from(client: VfioClient, fd: int, addr: int, count: int) -> int:
    r = await client._call(
        client.stub.WriteFrom, pb.WriteFromRequest(fd=fd, addr=addr, count=count)
    )
    return int(r.count)


async def subscribe(client: VfioClient, device: str = "") -> Any:
    """An Events stream of `client` (one device, or all), once subscribed."""
    call = client.stub.Events(pb.EventsRequest(device=device), metadata=client.metadata)
    assert (EVENTS_KEY, "subscribed") in tuple(await call.initial_metadata())
    return call


async def events_until(call: Any, done: Callable[[pb.Event], bool]) -> list[pb.Event]:
    """The events of a stream up to and including the first `done` one."""
    got: list[pb.Event] = []
    while True:
        ev = await asyncio.wait_for(call.read(), 10)
        assert ev is not grpc.aio.EOF, "the Events stream ended"
        got.append(ev)
        if done(ev):
            return got


async def audit(client: VfioClient, device: str = "") -> pb.AuditResponse:
    return await client._call(client.stub.Audit, pb.AuditRequest(device=device))


async def refused(call: Awaitable[Any], reason: str) -> VfioCallError:
    """A driver call fails with the errno named `reason` (ErrorInfo reason,
    domain vfio.kernel, and the errno number)."""
    with pytest.raises(VfioCallError) as e:
        await call
    info = e.value.info
    assert (info.domain, info.reason) == (VFIO_DOMAIN, reason), info
    assert e.value.errno == getattr(errno, reason), info
    return e.value


async def denied(call: Any, code: grpc.StatusCode, reason: str) -> ErrorInfo:
    """A fwemu call (a unary call, or a stream read to its end) fails with
    gRPC `code` and ErrorInfo `reason` (domain fwemu.emulator)."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    info = error_info(e.value)
    assert (info.code, info.reason, info.domain) == (code, reason, FWEMU_DOMAIN), info
    return info
