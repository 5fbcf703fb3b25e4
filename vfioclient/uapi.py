"""The VFIO migration uAPI for clients: the numbers and struct layouts of
include/uapi/linux/vfio.h, as ioctl code uses them.

    from vfioclient.uapi import MIG_STATE, Feature, MigState, VFIO_DEVICE_FEATURE_SET

These are driver/vfio/uapi.py's own objects, re-exported: as userspace and
the kernel share one linux/vfio.h, the client and the driver share one table
(a pure module, no server code), so they cannot drift apart.  Client code
imports them from here, never from the driver's package.
"""

from __future__ import annotations

from driver.vfio.uapi import (
    DMA_LOGGING_CONTROL,
    DMA_LOGGING_RANGE,
    DMA_LOGGING_REPORT,
    FEATURE_HEADER,
    MIG_DATA_SIZE,
    MIG_STATE,
    MIGRATION,
    PAGE_SIZE,
    PRECOPY_INFO,
    VFIO_BASE,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_STATE_NR,
    VFIO_MIG_GET_PRECOPY_INFO,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    VFIO_PRECOPY_INFO_REINIT,
    VFIO_TYPE,
    Feature,
    MigState,
)

__all__ = [
    "DMA_LOGGING_CONTROL",
    "DMA_LOGGING_RANGE",
    "DMA_LOGGING_REPORT",
    "FEATURE_HEADER",
    "MIGRATION",
    "MIG_DATA_SIZE",
    "MIG_STATE",
    "PAGE_SIZE",
    "PRECOPY_INFO",
    "VFIO_BASE",
    "VFIO_DEVICE_FEATURE",
    "VFIO_DEVICE_FEATURE_GET",
    "VFIO_DEVICE_FEATURE_MASK",
    "VFIO_DEVICE_FEATURE_PROBE",
    "VFIO_DEVICE_FEATURE_SET",
    "VFIO_DEVICE_STATE_NR",
    "VFIO_MIGRATION_P2P",
    "VFIO_MIGRATION_PRE_COPY",
    "VFIO_MIGRATION_STOP_COPY",
    "VFIO_MIG_GET_PRECOPY_INFO",
    "VFIO_PRECOPY_INFO_REINIT",
    "VFIO_TYPE",
    "Feature",
    "MigState",
]
