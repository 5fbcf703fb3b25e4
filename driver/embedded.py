"""The whole stack in one process: a driver service over an embedded firmware,
with the firmware's Scenario service on the same loopback port.  This is the
composition root of `vfioctl demo`'s default (no separate server to start), so
that the client imports this entry point and never the service's modules."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fwemu.embedded import EmbeddedFirmware

from .registry import DeviceRegistry
from .service.server import DriverServer


@contextlib.asynccontextmanager
async def serve_embedded(
    firmware: EmbeddedFirmware, listen: str = "127.0.0.1:0"
) -> AsyncIterator[str]:
    """Serve `firmware`'s VFs through a driver (and its Scenario service) on
    `listen`; yields HOST:PORT, and stops the server on the way out."""
    server = DriverServer(DeviceRegistry(firmware.link), firmware=firmware, scenario_service=True)
    port = await server.start(listen)
    try:
        yield f"{listen.rsplit(':', 1)[0]}:{port}"
    finally:
        await server.stop(0.5)
