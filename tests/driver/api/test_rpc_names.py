"""No RPC of the project's services shadows a method grpc-js (or another
common client library) puts on every client object: grpc-js exposes each RPC
under its name and its lowerCamel name, so an RPC named `Close` hid
`client.close()` and broke `grpc.closeClient()` (issue 14)."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FileDescriptor

from driver.api.v1 import vfio_pb2
from fwemu.api.v1 import firmware_pb2, scenario_pb2

# Methods of grpc-js's Client (and grpc-web's / Python stubs' common ones).
CLIENT_METHODS = {
    "close",
    "getChannel",
    "waitForReady",
    "makeUnaryRequest",
    "makeClientStreamRequest",
    "makeServerStreamRequest",
    "makeBidiStreamRequest",
    "constructor",
    "toString",
}


def _lower_camel(name: str) -> str:
    return name[:1].lower() + name[1:]


@pytest.mark.parametrize(
    "file", [vfio_pb2.DESCRIPTOR, firmware_pb2.DESCRIPTOR, scenario_pb2.DESCRIPTOR]
)
def test_no_rpc_shadows_a_client_method(file: FileDescriptor) -> None:
    for service in file.services_by_name.values():
        for method in service.methods:
            assert {method.name, _lower_camel(method.name)}.isdisjoint(CLIENT_METHODS), (
                f"{service.full_name}.{method.name} shadows a client method"
            )


def test_closing_an_fd_is_close_fd() -> None:
    vfio = vfio_pb2.DESCRIPTOR.services_by_name["Vfio"]
    assert "CloseFd" in vfio.methods_by_name and "Close" not in vfio.methods_by_name
