"""The Vfio service's health follows the firmware links: NOT_SERVING while
any shard's completion stream is down, SERVING again once every one is back."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from driver.registry import DeviceRegistry
from driver.service.server import VFIO_SERVICE, DriverServer
from fwemu.link.grpc import GrpcLink
from fwemu.model import Firmware, VirtualClock
from fwemu.service.server import FirmwareServer
from tests.support.driver_service import eventually

pytestmark = pytest.mark.grpc
Status = health_pb2.HealthCheckResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def health(target: str, service: str) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        req = health_pb2.HealthCheckRequest(service=service)
        return int((await health_pb2_grpc.HealthStub(ch).Check(req, timeout=5)).status)


async def test_one_shard_down_is_not_serving_until_it_is_back() -> None:
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    servers = [FirmwareServer(Firmware(VirtualClock(), seed=k)) for k in range(2)]
    for srv, address in zip(servers, addresses, strict=True):
        await srv.start(address)
    links = [await GrpcLink.connect(a) for a in addresses]
    driver = DriverServer(DeviceRegistry(links))
    target = f"127.0.0.1:{await driver.start('127.0.0.1:0')}"
    try:

        async def vfio_is(status: int) -> bool:
            return await health(target, VFIO_SERVICE) == status

        assert await vfio_is(Status.SERVING)
        await servers[1].stop(0)
        assert await eventually(lambda: vfio_is(Status.NOT_SERVING))
        assert await health(target, "") == Status.SERVING
        servers[1] = FirmwareServer(Firmware(VirtualClock(), seed=1))
        await servers[1].start(addresses[1])
        assert await eventually(lambda: vfio_is(Status.SERVING))
    finally:
        await driver.stop(0)
        for link in links:
            await link.close()
        for srv in servers:
            await srv.stop(0)
