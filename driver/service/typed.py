"""The typed form of VFIO_DEVICE_FEATURE for the migration features
(TypedFeature in vfio.proto): packed into the raw ioctl (argsz, flags, data)
exactly as an ioctl caller packs it, and the kernel's answer unpacked again.

Both forms reach the same VfioDevice.device_feature, so the typed form
accepts and refuses what the raw one does; only what the raw form cannot
express (a typed request that also sets raw fields) is refused here.
"""

from __future__ import annotations

import errno

from ..api.v1 import vfio_pb2 as pb
from ..vfio.errors import VfioError
from ..vfio.uapi import (
    FEATURE_HEADER,
    MIG_DATA_SIZE,
    MIG_STATE,
    MIGRATION,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    Feature,
)

# oneof field -> (feature, the struct a GET or SET moves; None: no payload)
_FEATURES = {
    "migration": (Feature.MIGRATION, MIGRATION),
    "mig_device_state": (Feature.MIG_DEVICE_STATE, MIG_STATE),
    "mig_data_size": (Feature.MIG_DATA_SIZE, MIG_DATA_SIZE),
    "mig_precopy_info_v2": (Feature.MIG_PRECOPY_INFOv2, None),
}


def pack(request: pb.DeviceFeatureRequest) -> tuple[int, int, bytes]:
    """(argsz, flags, data) of a typed request, as QEMU packs the struct:
    pre-sized for its output, data_fd -1 on the way in."""
    if request.argsz or request.flags or request.data:
        raise VfioError(errno.EINVAL, "a typed feature request takes no argsz, flags or data")
    typed = request.typed
    which = typed.WhichOneof("feature")
    if which is None:
        raise VfioError(
            errno.EINVAL, f"a typed feature request names one of {', '.join(_FEATURES)}"
        )
    feature, layout = _FEATURES[which]
    flags = int(feature)
    flags |= VFIO_DEVICE_FEATURE_GET if typed.get else 0
    flags |= VFIO_DEVICE_FEATURE_SET if typed.set else 0
    flags |= VFIO_DEVICE_FEATURE_PROBE if typed.probe else 0
    data = b""
    if layout is MIG_STATE:
        # The struct's __u32, as a C caller's value lands in it (-1: 0xffffffff).
        data = MIG_STATE.pack(typed.mig_device_state.device_state & 0xFFFFFFFF, -1)
    elif layout is not None:
        data = bytes(layout.size)
    return FEATURE_HEADER.size + len(data), flags, data


def unpack(request: pb.DeviceFeatureRequest, data: bytes) -> pb.TypedFeature | None:
    """The answer's TypedFeature: the request's op and feature with the
    struct the ioctl copied back; None for a PROBE (no data moves)."""
    typed = request.typed
    if typed.probe:
        return None
    out = pb.TypedFeature(get=typed.get, set=typed.set)
    which = typed.WhichOneof("feature")
    if which == "migration":
        (flags,) = MIGRATION.unpack_from(data)
        out.migration.CopyFrom(
            pb.MigrationFeature(
                flags=flags,
                stop_copy=bool(flags & VFIO_MIGRATION_STOP_COPY),
                p2p=bool(flags & VFIO_MIGRATION_P2P),
                pre_copy=bool(flags & VFIO_MIGRATION_PRE_COPY),
            )
        )
    elif which == "mig_device_state":
        state, data_fd = MIG_STATE.unpack_from(data)
        out.mig_device_state.CopyFrom(pb.MigDeviceStateFeature(device_state=state, data_fd=data_fd))
    elif which == "mig_data_size":
        (length,) = MIG_DATA_SIZE.unpack_from(data)
        out.mig_data_size.CopyFrom(pb.MigDataSizeFeature(stop_copy_length=length))
    else:
        out.mig_precopy_info_v2.SetInParent()
    return out
