"""Server reflection v1 as well as v1alpha (grpcsvc/reflection.py): both list
the services, and both describe a service, themselves included."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as alpha

from driver.api.v1 import vfio_pb2_grpc
from grpcsvc.server import GrpcService

pytestmark = pytest.mark.grpc

PATHS = {
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}


@pytest.fixture(name="target")
async def target_fixture() -> AsyncIterator[str]:
    def register(server: grpc.aio.Server) -> None:
        vfio_pb2_grpc.add_VfioServicer_to_server(vfio_pb2_grpc.VfioServicer(), server)

    service = GrpcService(["vfio.v1.Vfio"], register)
    port = await service.start("127.0.0.1:0")
    yield f"127.0.0.1:{port}"
    await service.stop(0)


async def _ask(
    target: str, version: str, request: alpha.ServerReflectionRequest
) -> alpha.ServerReflectionResponse:
    # v1's messages are v1alpha's, field for field: the same bytes on the wire.
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.stream_stream(
            PATHS[version],
            request_serializer=alpha.ServerReflectionRequest.SerializeToString,
            response_deserializer=alpha.ServerReflectionResponse.FromString,
        )
        stream = call()
        await stream.write(request)
        await stream.done_writing()
        response = await stream.read()
        assert isinstance(response, alpha.ServerReflectionResponse)
        return response


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_both_versions_list_the_services(target: str, version: str) -> None:
    r = await _ask(target, version, alpha.ServerReflectionRequest(list_services=""))
    names = {s.name for s in r.list_services_response.service}
    assert {
        "vfio.v1.Vfio",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("vfio.v1.Vfio", None),
        ("grpc.reflection.v1.ServerReflection", "grpc/reflection/v1/reflection.proto"),
    ],
)
async def test_both_versions_describe_a_service(
    target: str, version: str, symbol: str, file: str | None
) -> None:
    r = await _ask(target, version, alpha.ServerReflectionRequest(file_containing_symbol=symbol))
    assert not r.HasField("error_response"), r.error_response
    fdp = descriptor_pb2.FileDescriptorProto.FromString(
        r.file_descriptor_response.file_descriptor_proto[0]
    )
    package, _, service = symbol.rpartition(".")
    assert fdp.package == package and service in {s.name for s in fdp.service}
    if file is not None:
        assert fdp.name == file
        method = fdp.service[0].method[0]
        assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
