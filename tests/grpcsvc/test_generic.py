"""grpcsvc.generic: handlers added as generic handlers only (grpc.aio waits on
a request task per registered method for every call it accepts)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpcsvc.generic import GenericHandlersOnly
from grpcsvc.server import GrpcService
from tests.support.registrations import registrations  # noqa: F401  (a fixture)

pytestmark = pytest.mark.grpc

SERVICE = "probe.v1.Probe"


def _identity(b: bytes) -> bytes:
    return b


async def _echo(request: bytes, context: Any) -> bytes:
    return b"echo:" + request


class _Recorder:
    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered.append(service)


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_registered_handlers_are_added_as_a_generic_handler_of_the_same_handlers() -> None:
    handler = grpc.unary_unary_rpc_method_handler(_echo, _identity, _identity)
    server = _Recorder()
    GenericHandlersOnly(server).add_registered_method_handlers(  # type: ignore[arg-type]
        SERVICE, {"Echo": handler}
    )
    assert server.registered == []
    (generic,) = server.generic
    assert generic.service(_Details(f"/{SERVICE}/Echo")) is handler
    assert generic.service(_Details(f"/{SERVICE}/Other")) is None


async def test_a_service_registers_health_and_reflection_as_generic_handlers(
    registrations: list[str],  # noqa: F811
) -> None:
    """Health and reflection answer as before, at no per-call cost to the service's calls."""

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(_echo, _identity, _identity)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),)
        )

    service = GrpcService([SERVICE], register)
    port = await service.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            echo = ch.unary_unary(f"/{SERVICE}/Echo", _identity, _identity)
            assert await echo(b"x", timeout=5) == b"echo:x"
            check = health_pb2_grpc.HealthStub(ch).Check
            answer = await check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            other = ch.unary_unary(f"/{SERVICE}/Other", _identity, _identity)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await other(b"x", timeout=5)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await service.stop(0)
    assert registrations == []
