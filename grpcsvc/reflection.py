"""Server reflection, v1 as well as v1alpha.

grpcio-reflection serves only `grpc.reflection.v1alpha.ServerReflection`;
newer tools (grpcurl, Postman, buf curl) ask for `grpc.reflection.v1` first.
The two protocols are the same messages under another package name
(grpc/reflection/v1/reflection.proto is a copy of v1alpha's), so v1 is served
by the same servicer with the v1alpha message classes on the wire, and its
descriptor (v1alpha's, renamed) is added to the default pool so that
reflection can describe itself under both names.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as alpha
from grpc_reflection.v1alpha import reflection_pb2_grpc as alpha_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from .generic import GenericHandlersOnly

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
_ALPHA_PREFIX = f".{alpha.DESCRIPTOR.package}."


@functools.cache
def _add_v1_descriptor() -> None:
    """grpc/reflection/v1/reflection.proto in the default pool: v1alpha's
    file under the v1 package (once per process)."""
    fdp = descriptor_pb2.FileDescriptorProto()
    alpha.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "grpc/reflection/v1/reflection.proto"
    fdp.package = V1_PACKAGE
    fdp.ClearField("options")

    def renamed(type_name: str) -> str:
        if type_name.startswith(_ALPHA_PREFIX):
            return f".{V1_PACKAGE}.{type_name[len(_ALPHA_PREFIX) :]}"
        return type_name

    for msg in fdp.message_type:
        for field in msg.field:
            if field.HasField("type_name"):  # a scalar has none: setting "" would be one
                field.type_name = renamed(field.type_name)
    for service in fdp.service:
        for method in service.method:
            method.input_type = renamed(method.input_type)
            method.output_type = renamed(method.output_type)
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(fdp.name)
    except KeyError:
        pool.Add(fdp)


def enable_server_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on `server` for `service_names` (both
    reflection services are added to the list)."""
    _add_v1_descriptor()
    names = [*service_names, reflection.SERVICE_NAME, V1_SERVICE]
    servicer = ReflectionServicer(names)
    # What reflection.enable_server_reflection adds to an aio server, as
    # generic handlers (GenericHandlersOnly: no per-call cost to the others).
    generic: Any = GenericHandlersOnly(server)
    alpha_grpc.add_ServerReflectionServicer_to_server(servicer, generic)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=alpha.ServerReflectionRequest.FromString,
        response_serializer=alpha.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": handler}),)
    )
