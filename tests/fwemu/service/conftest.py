"""A real FirmwareServer on 127.0.0.1 with mutual TLS and the test PKI's roles
(tests/support/tls.py: vfio-driver drives, lab-admin administers, team-a and
team-b are tenants), and raw stubs that call it as each of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from fwemu.api.v1 import firmware_pb2_grpc as fgrpc
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from fwemu.link.ifc import VfConfig
from fwemu.model import Firmware, VirtualClock
from fwemu.service.server import FirmwareServer
from grpcsvc.tls import aio_channel
from tests.support.tls import Pki

VF = VfConfig(size=64 * 1024, dirty_bytes_per_s=0)


@dataclass
class Served:
    """The firmware, where it listens, and the channels opened to it."""

    fw: Firmware
    server: FirmwareServer
    target: str
    pki: Pki
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, name: str) -> grpc.aio.Channel:
        """A channel whose client certificate is `name`'s."""
        ch = aio_channel(self.target, self.pki.client_tls(name))
        self.channels.append(ch)
        return ch

    def firmware(self, name: str) -> fgrpc.FirmwareStub:
        return fgrpc.FirmwareStub(self.channel(name))

    def scenario(self, name: str) -> sgrpc.ScenarioStub:
        return sgrpc.ScenarioStub(self.channel(name))


@pytest.fixture
async def mtls(pki: Pki) -> AsyncIterator[Served]:
    """Three VFs (vhca_id 1..3) on a virtual clock, served with mutual TLS."""
    fw = Firmware(VirtualClock(), seed=7)
    fw.create_vfs(3, VF)
    server = FirmwareServer(fw, roles=pki.roles())
    port = await server.start("127.0.0.1:0", tls_config=pki.server_tls())
    served = Served(fw, server, f"127.0.0.1:{port}", pki)
    yield served
    for ch in served.channels:
        await ch.close(None)
    await server.stop(0)
