"""The firmware link the harness gives a driver (or a firmware test) over
gRPC, in the run's mode (tests/support/tls_mode.py).  Kept apart from
tls_mode so that what every test imports needs no generated gRPC code."""

from __future__ import annotations

from typing import Any

from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from fwemu.link.grpc import GrpcLink
from grpcsvc.options import CHANNEL_OPTIONS
from grpcsvc.tls import aio_channel
from tests.support.tls import ADMIN
from tests.support.tls_mode import client_tls, link_tls


class HarnessLink(GrpcLink):
    """The firmware link the harness gives a driver (or a firmware test): its
    Firmware service calls are the driver's (DRIVER's certificate, so its mkeys
    are the driver's), and its Scenario side, which the tests use to create
    VFs, read digests and inject faults, is the admin's, as an orchestrator
    beside the driver would be.  In plaintext both are the one anonymous
    principal, over one channel, as a plain GrpcLink."""

    def __init__(self, target: str, **kw: Any) -> None:
        kw.setdefault("tls", link_tls(target))
        super().__init__(target, **kw)
        admin = client_tls(target, ADMIN)
        self._admin_channel = None
        if admin is not None:
            self._admin_channel = aio_channel(target, admin, options=CHANNEL_OPTIONS)
            self.scenario = sgrpc.ScenarioStub(self._admin_channel)

    async def close(self) -> None:
        await super().close()
        if self._admin_channel is not None:
            await self._admin_channel.close(None)
            self._admin_channel = None


async def connect_link(target: str, **kw: Any) -> GrpcLink:
    """HarnessLink.connect: a driver's link to a firmware the harness serves."""
    return await HarnessLink.connect(target, tls=link_tls(target), **kw)
