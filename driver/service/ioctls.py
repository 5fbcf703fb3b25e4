"""The calls the Vfio service answers both as unary RPCs and on the Ioctl
stream (DeviceFeature: ioctl(VFIO_DEVICE_FEATURE); PrecopyInfo:
ioctl(VFIO_MIG_GET_PRECOPY_INFO); CloseFd: close(2)): one body each, so that
both transports answer the same, errno for errno.  A VfioError raised here is
the errno."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Mapping

from ..api.v1 import vfio_pb2 as pb
from ..mlx5.latency import LatencyHistogram
from ..vfio.errors import VfioError
from ..vfio.ops import MigrationFile
from ..vfio.uapi import (
    PRECOPY_INFO,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_MIG_GET_PRECOPY_INFO,
    Feature,
)
from ..vfio.usermem import UserMemory
from . import typed
from .errnos import UNEXPECTED, as_vfio_error, errno_name
from .fdcalls import stream_of, user_memory
from .process import DataFd, DeviceFd, Process
from .uninterruptible import Calls

# The operations of vfio_ioctl_seconds (driver/service/metrics.py), and how they came.
IOCTL_OPERATIONS = ("device_feature", "set_state", "precopy_info")
IOCTL_TRANSPORTS = ("unary", "stream")


def feature_operation(flags: int) -> str:
    """The operation a VFIO_DEVICE_FEATURE call is counted and logged as."""
    if flags & VFIO_DEVICE_FEATURE_MASK == Feature.MIG_DEVICE_STATE and (
        flags & VFIO_DEVICE_FEATURE_SET
    ):
        return "set_state"
    return "device_feature"


async def device_feature(
    calls: Calls,
    proc: Process,
    request: pb.DeviceFeatureRequest,
    argsz: int,
    flags: int,
    arg: bytes,
) -> tuple[bytes, UserMemory, int]:
    """ioctl(VFIO_DEVICE_FEATURE) of a request (argsz, flags and arg packed
    from its typed form, if it has one): its data, the user memory it touched
    and the data fd it opened (-1: none)."""
    new_fd = -1
    user = user_memory(request.user_memory)
    device = proc.device(request.fd)

    def install(file: MigrationFile) -> int:
        nonlocal new_fd
        stream, saving = stream_of(file)
        new_fd = proc.install(DataFd(file, device, stream, saving))
        return new_fd

    data = await calls.run(device.device_feature(argsz, flags, arg, user=user, install_fd=install))
    return data, user, new_fd


def feature_response(
    request: pb.DeviceFeatureRequest, data: bytes, user: UserMemory, new_fd: int
) -> pb.DeviceFeatureResponse:
    return pb.DeviceFeatureResponse(
        data=data,
        user_memory=[pb.UserBuffer(addr=a, data=bytes(b)) for a, b in user.buffers.items()],
        data_fd=new_fd,
        typed=typed.unpack(request, data) if request.HasField("typed") else None,
    )


async def precopy_info(
    calls: Calls, proc: Process, request: pb.PrecopyInfoRequest
) -> pb.PrecopyInfoResponse:
    """ioctl(VFIO_MIG_GET_PRECOPY_INFO) on a data fd (ENOTTY on a device fd)."""
    entry = proc.get(request.fd)
    if isinstance(entry, DeviceFd):
        raise VfioError(errno.ENOTTY, "VFIO_MIG_GET_PRECOPY_INFO is a data fd ioctl")
    arg = PRECOPY_INFO.pack(
        request.argsz, request.flags, request.initial_bytes, request.dirty_bytes
    )
    out = await calls.run(entry.file.ioctl(VFIO_MIG_GET_PRECOPY_INFO, arg))
    argsz, flags, initial, dirty = PRECOPY_INFO.unpack_from(out, 0)
    return pb.PrecopyInfoResponse(
        argsz=argsz, flags=flags, initial_bytes=initial, dirty_bytes=dirty
    )


async def close_fd(calls: Calls, proc: Process, request: pb.CloseFdRequest) -> pb.CloseFdResponse:
    """close(2) of a device fd or a data fd (EBADF: not open)."""
    await calls.run(proc.close(request.fd))
    return pb.CloseFdResponse()


# Counts, publishes and logs an errno answer (VfioServicer._errno_answered): the errno.
ErrnoAnswered = Callable[..., int]


async def answer_ioctl(
    calls: Calls,
    proc: Process,
    request: pb.IoctlRequest,
    errno_answered: ErrnoAnswered,
    seconds: Mapping[tuple[str, str], LatencyHistogram],
) -> pb.IoctlAnswer:
    """One request of an Ioctl stream, answered as its unary RPC would be:
    its response, or its errno in band (counted, published and logged as
    the unary RPC's); timed in `seconds` as transport "stream"."""
    began = time.perf_counter()
    operation, fd = "ioctl", -1
    try:
        which = request.WhichOneof("ioctl")
        if which == "device_feature":
            feature = request.device_feature
            operation, fd = "device_feature", feature.fd
            argsz, flags, arg = feature.argsz, feature.flags, feature.data
            if feature.HasField("typed"):
                argsz, flags, arg = typed.pack(feature)
            operation = feature_operation(flags)
            done = await device_feature(calls, proc, feature, argsz, flags, arg)
            return pb.IoctlAnswer(device_feature=feature_response(feature, *done))
        if which == "precopy_info":
            operation, fd = "precopy_info", request.precopy_info.fd
            return pb.IoctlAnswer(
                precopy_info=await precopy_info(calls, proc, request.precopy_info)
            )
        if which == "close_fd":
            operation, fd = "close", request.close_fd.fd
            return pb.IoctlAnswer(close_fd=await close_fd(calls, proc, request.close_fd))
        raise VfioError(
            errno.EINVAL, "the Ioctl request names no call (device_feature, precopy_info, close_fd)"
        )
    except UNEXPECTED as exc:  # VfioError is an OSError
        e = as_vfio_error(exc)
        code = errno_answered(e, operation, proc=proc, fd=fd)
        return pb.IoctlAnswer(
            error=pb.ErrorAnswer(
                errno_name=errno_name(code), errno=code, operation=operation, message=str(e)
            )
        )
    finally:
        histogram = seconds.get((operation, "stream"))
        if histogram is not None:  # not a request naming no ioctl
            histogram.observe(time.perf_counter() - began)
