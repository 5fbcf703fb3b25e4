"""vfio_check_feature() of include/linux/vfio.h: the argument check every
VFIO_DEVICE_FEATURE handler (core or driver) runs first."""

from __future__ import annotations

import errno

from .errors import VfioError
from .uapi import VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET


def vfio_check_feature(flags: int, argsz: int, supported_ops: int, minsz: int) -> bool:
    """True: go ahead with the GET/SET.  False: a PROBE, answered with success
    and nothing else (the kernel's return 0; argsz is not checked then).
    Raises VfioError(EINVAL) where the kernel returns -EINVAL.

    `argsz` is the size of the data part (the header's argsz - 8); PROBE is
    implicitly supported by every feature.
    """
    ops = flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET)
    if ops & ~supported_ops:
        raise VfioError(errno.EINVAL, "GET/SET not supported by this feature")
    if flags & VFIO_DEVICE_FEATURE_PROBE:
        return False
    if not ops:
        raise VfioError(errno.EINVAL, "neither GET nor SET requested")
    if argsz < minsz:
        raise VfioError(errno.EINVAL, f"data part has {argsz} bytes, {minsz} needed")
    return True
