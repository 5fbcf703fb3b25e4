"""Kernel errnos on the wire: the gRPC code each maps to, and the ErrorInfo
(reason = errno name, metadata errno = its number) clients read back."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError

from grpcsvc.errnames import errno_name as kernel_errno_name
from grpcsvc.errors import abort

from ..vfio.errors import VfioError

DOMAIN = "vfio.kernel"
ERESTARTSYS = 512  # kernel-internal: an interrupted wait

# errno -> gRPC status code (documented in the README)
ERRNO_CODES: dict[int, grpc.StatusCode] = {
    errno.EINVAL: grpc.StatusCode.INVALID_ARGUMENT,
    errno.EFAULT: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ESPIPE: grpc.StatusCode.INVALID_ARGUMENT,
    errno.E2BIG: grpc.StatusCode.INVALID_ARGUMENT,
    errno.EOVERFLOW: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ENOTTY: grpc.StatusCode.UNIMPLEMENTED,
    errno.EOPNOTSUPP: grpc.StatusCode.UNIMPLEMENTED,
    errno.ENOMSG: grpc.StatusCode.OUT_OF_RANGE,  # a temporary end of stream
    errno.EAGAIN: grpc.StatusCode.UNAVAILABLE,
    errno.EBUSY: grpc.StatusCode.UNAVAILABLE,
    errno.ENOTCONN: grpc.StatusCode.UNAVAILABLE,
    errno.ENODEV: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EBADF: grpc.StatusCode.NOT_FOUND,
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.EIO: grpc.StatusCode.INTERNAL,
    errno.EREMOTEIO: grpc.StatusCode.INTERNAL,
    errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EMFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENFILE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ETIMEDOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    errno.EINTR: grpc.StatusCode.CANCELLED,
    ERESTARTSYS: grpc.StatusCode.CANCELLED,
}


def errno_name(code: int) -> str:
    if code == ERESTARTSYS:
        return "ERESTARTSYS"
    return kernel_errno_name(code)


def grpc_code(code: int) -> grpc.StatusCode:
    return ERRNO_CODES.get(code, grpc.StatusCode.UNKNOWN)


def errno_of(e: VfioError) -> int:
    """The errno the service answers `e` with."""
    return e.errno or errno.EIO


# What a call may raise besides a VfioError, answered as the kernel would:
# a malformed message or one nested past the parser's depth is EINVAL, memory
# that cannot be had ENOMEM, an OSError (mmap, a file) its own errno.
UNEXPECTED = (DecodeError, RecursionError, MemoryError, OSError)


def as_vfio_error(e: BaseException) -> VfioError:
    """One of UNEXPECTED as the VfioError the service answers with."""
    if isinstance(e, VfioError):
        return e
    if isinstance(e, MemoryError):
        return VfioError(errno.ENOMEM, f"out of memory: {e}")
    if isinstance(e, OSError):
        return VfioError(e.errno or errno.EIO, f"{e.strerror or e}")
    if isinstance(e, RecursionError):
        return VfioError(errno.EINVAL, f"input nested too deep: {e}")
    return VfioError(errno.EINVAL, f"malformed message: {e}")


async def abort_errno(
    context: grpc.aio.ServicerContext[object, object],
    e: VfioError,
    extra: Mapping[str, str] | None = None,
) -> NoReturn:
    code = errno_of(e)
    await abort(
        context,
        grpc_code(code),
        str(e),
        reason=errno_name(code),
        domain=DOMAIN,
        metadata={"errno": str(code), **e.details, **(extra or {})},
    )
