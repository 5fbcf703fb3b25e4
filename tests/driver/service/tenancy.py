"""A driver served with mutual TLS to two tenants and an admin (the `pki`
fixture's certificates), over an embedded firmware with its Scenario
service: what the tests of principals, owned devices and filtered events
run against.  Each tenant is a `tests.support.driver_service.VfioClient`
over a TLS channel, so the wire contract is the one the other service
tests pin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.registry import DeviceRegistry, pci_name
from driver.service.server import DriverServer
from driver.service.servicer import EVENTS_KEY
from driver.vfio.uapi import MigState
from fwemu.embedded import EmbeddedFirmware
from fwemu.link.ifc import VfConfig
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from grpcsvc.tls import ClientTls
from tests.support.driver_service import CMD_TIMEOUT, SMALL_VF, Vf, VfioClient
from tests.support.tls import TENANTS, Pki

S = MigState
A, B = TENANTS
# A VF whose image is a few records: a migration worth comparing digests of.
WORKLOAD: dict[str, Any] = {"size": 1 << 20, "dirty_bytes_per_s": 0}


class TenantClient(VfioClient):
    """VfioClient over TLS (mutual with a client certificate): its calls are
    its certificate's principal's."""

    @classmethod
    async def of(
        cls,
        target: str,
        tls: ClientTls | None,
        client_id: str | None = None,
        *,
        session: bool = True,
    ) -> TenantClient:
        client = await cls.connect(target, client_id, session=session, tls=tls)
        assert isinstance(client, TenantClient)
        return client

    async def events(self, device: str = "") -> Any:
        """An Events stream, once subscribed."""
        call = self.stub.Events(pb.EventsRequest(device=device), metadata=self.metadata)
        assert (EVENTS_KEY, "subscribed") in tuple(await call.initial_metadata())
        return call

    async def audit(self, device: str = "") -> pb.AuditResponse:
        return await self._call(self.stub.Audit, pb.AuditRequest(device=device))


@dataclass
class Tenancy:
    pki: Pki
    fw: Firmware
    firmware: EmbeddedFirmware
    server: DriverServer
    target: str
    clients: list[TenantClient]

    async def client(
        self, name: str | None, client_id: str | None = None, *, session: bool = True
    ) -> TenantClient:
        """A client with `name`'s certificate (None: none, server TLS only)."""
        tls = self.pki.client_tls(name)
        c = await TenantClient.of(self.target, tls, client_id, session=session)
        self.clients.append(c)
        return c

    def principal(self, name: str) -> str:
        return self.pki.principal(name)

    async def create_vfs(self, count: int = 1, **config: Any) -> list[Vf]:
        link = self.firmware.link
        vfs = await link.create_vfs(count, VfConfig(**{**SMALL_VF, **config}))
        await self.server.registry.refresh()
        return [Vf(pci_name(v.function_id), v.vhca_id) for v in vfs]

    async def digest(self, vf: Vf) -> str:
        return await self.firmware.link.digest(vf.vhca_id)


@pytest.fixture(name="tenancy")
async def tenancy_fixture(pki: Pki) -> AsyncIterator[Tenancy]:
    """A driver with mutual TLS and the tests' roles (ADMIN administers),
    over an embedded firmware whose Scenario service it serves too."""
    fw = Firmware(LoopClock(), seed=11)
    firmware = EmbeddedFirmware(fw)
    server = DriverServer(
        DeviceRegistry(firmware.link, cmd_timeout=CMD_TIMEOUT),
        firmware=firmware,
        scenario_service=True,
        roles=pki.roles(),
    )
    port = await server.start("127.0.0.1:0", tls_config=pki.server_tls())
    t = Tenancy(pki, fw, firmware, server, f"127.0.0.1:{port}", [])
    yield t
    for c in t.clients:
        await c.close_channel()
    await server.stop(0)
    await firmware.link.close()


@dataclass
class InFlight:
    """A migration from `src` to `dst` by one client, both data fds open:
    the saving fd in STOP_COPY, the resuming fd in RESUMING."""

    client: TenantClient
    src: Vf
    dst: Vf
    sfd: int
    dfd: int
    saving: int
    resuming: int


async def start_migration(client: TenantClient, src: Vf, dst: Vf) -> InFlight:
    sfd = await client.open_device(src.name)
    dfd = await client.open_device(dst.name)
    await client.set_state(sfd, S.STOP)
    saving = await client.set_state(sfd, S.STOP_COPY)
    await client.set_state(dfd, S.STOP)
    resuming = await client.set_state(dfd, S.RESUMING)
    return InFlight(client, src, dst, sfd, dfd, saving, resuming)


async def finish_migration(m: InFlight, t: Tenancy) -> None:
    """Read the stream to its end, load it, STOP both: the destination's
    digest is the source's.  The fds are closed afterwards."""
    c = m.client
    chunks, err = await c.read_all(m.saving)
    assert err is None, err
    stream = b"".join(chunks)
    assert stream
    assert await c.write(m.resuming, [stream]) == len(stream)
    await c.set_state(m.sfd, S.STOP)
    await c.set_state(m.dfd, S.STOP)
    assert await t.digest(m.dst) == await t.digest(m.src)
    for fd in (m.saving, m.resuming, m.sfd, m.dfd):
        await c.close(fd)


async def next_event(call: Any, timeout: float = 5.0) -> pb.Event:
    ev = await asyncio.wait_for(call.read(), timeout)
    assert ev is not grpc.aio.EOF, "the Events stream ended"
    assert isinstance(ev, pb.Event)
    return ev


async def events_until(call: Any, done: Any, timeout: float = 5.0) -> list[pb.Event]:
    """Events up to and including the first `done(event)` one."""
    got = []
    while True:
        ev = await next_event(call, timeout)
        got.append(ev)
        if done(ev):
            return got
