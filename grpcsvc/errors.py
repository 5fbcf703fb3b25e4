"""Errors as values of the domain on the wire: a google.rpc.Status whose
ErrorInfo carries a machine-readable reason (an errno name, a syndrome) and
metadata, read back by clients without parsing messages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

_DETAILS_KEY = "grpc-status-details-bin"


def rich_status(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str,
    domain: str,
    metadata: Mapping[str, str] | None = None,
) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=dict(metadata or {}))
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return rpc_status.to_status(status)


async def abort(
    context: grpc.aio.ServicerContext[object, object],
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str,
    domain: str,
    metadata: Mapping[str, str] | None = None,
) -> NoReturn:
    status = rich_status(code, message, reason=reason, domain=domain, metadata=metadata)
    await context.abort_with_status(status)  # type: ignore[attr-defined]  # stubs predate it
    raise AssertionError("abort_with_status returned")  # pragma: no cover


@dataclass(frozen=True)
class ErrorInfo:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def error_info(err: grpc.aio.AioRpcError) -> ErrorInfo:
    """The ErrorInfo of a failed call (empty reason when the server sent none)."""
    items: list[tuple[str, str | bytes]] = list(err.trailing_metadata() or ())  # type: ignore[arg-type]
    for key, value in items:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return ErrorInfo(
                        err.code(), status.message, info.reason, info.domain, dict(info.metadata)
                    )
    return ErrorInfo(err.code(), err.details() or "")
