"""The vfio-driver gRPC server over a device registry."""

from __future__ import annotations

import asyncio

import grpc

from grpcsvc.server import GrpcService

from ..api.v1 import vfio_pb2
from ..api.v1 import vfio_pb2_grpc as pbg
from ..registry import DeviceRegistry
from .servicer import VfioServicer

VFIO_SERVICE = vfio_pb2.DESCRIPTOR.services_by_name["Vfio"].full_name


class DriverServer:
    """Serves a DeviceRegistry; make it inside the running event loop."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry
        self.servicer = VfioServicer(registry)

        def register(server: grpc.aio.Server) -> None:
            pbg.add_VfioServicer_to_server(self.servicer, server)

        self.service = GrpcService([VFIO_SERVICE], register)

    async def start(self, listen: str) -> int:
        await self.registry.refresh()
        return await self.service.start(listen)

    async def stop(self, grace: float = 1.0) -> None:
        await self.service.stop(grace)
        await self.servicer.close_all()

    async def serve_until(self, stop: asyncio.Event, grace: float = 5.0) -> None:
        await self.service.serve_until(stop, grace)
        await self.servicer.close_all()
