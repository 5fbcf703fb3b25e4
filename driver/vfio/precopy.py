"""VFIO_MIG_GET_PRECOPY_INFO: struct vfio_precopy_info and the core helper
vfio_check_precopy_ioctl() (include/linux/vfio.h) every driver runs first."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import VfioError
from .uapi import PRECOPY_INFO, VFIO_MIG_GET_PRECOPY_INFO
from .usermem import UserArg

if TYPE_CHECKING:
    from .device import VfioDevice


@dataclass
class VfioPrecopyInfo:
    """struct vfio_precopy_info."""

    argsz: int
    flags: int
    initial_bytes: int
    dirty_bytes: int

    @classmethod
    def unpack(cls, raw: bytes) -> VfioPrecopyInfo:
        return cls(*PRECOPY_INFO.unpack(raw))

    def pack(self) -> bytes:
        return PRECOPY_INFO.pack(self.argsz, self.flags, self.initial_bytes, self.dirty_bytes)


def vfio_check_precopy_ioctl(device: VfioDevice, cmd: int, arg: bytes) -> VfioPrecopyInfo:
    """Validate a VFIO_MIG_GET_PRECOPY_INFO call on a saving data fd.

    Returns the caller's 24 bytes as a VfioPrecopyInfo: every field holds what the
    caller passed (drivers copy all 24 bytes back, so a field a driver leaves
    alone echoes the input, the v1 behaviour), except that flags is zeroed once
    the device opted in with VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2.  The state
    check (PRE_COPY / PRE_COPY_P2P) is the driver's.
    """
    if cmd != VFIO_MIG_GET_PRECOPY_INFO:
        raise VfioError(errno.ENOTTY, f"ioctl {cmd:#x} is not VFIO_MIG_GET_PRECOPY_INFO")
    info = VfioPrecopyInfo.unpack(UserArg(arg).copy_from(0, PRECOPY_INFO.size))
    if info.argsz < PRECOPY_INFO.size:
        raise VfioError(errno.EINVAL, f"argsz {info.argsz} < {PRECOPY_INFO.size}")
    if device.precopy_info_v2:
        info.flags = 0
    return info
