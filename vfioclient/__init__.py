"""Clients of the vfio-driver service: a library that reads like ioctl code.

`VfioClient` (asyncio) and `SyncVfioClient` (blocking: scripts, threads,
gevent) make the same calls (vfioclient.calls); `vfioclient.uapi` holds the
numbers and struct layouts of linux/vfio.h that such code uses."""

from . import uapi
from .calls import AuditReport, Device, FeatureResult, PrecopyInfo, VfioClientError
from .client import VfioClient, read_all
from .sync import SyncVfioClient
from .uapi import (
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    VFIO_PRECOPY_INFO_REINIT,
    Feature,
    MigState,
)

__all__ = [
    "VFIO_DEVICE_FEATURE_GET",
    "VFIO_DEVICE_FEATURE_PROBE",
    "VFIO_DEVICE_FEATURE_SET",
    "VFIO_MIGRATION_P2P",
    "VFIO_MIGRATION_PRE_COPY",
    "VFIO_MIGRATION_STOP_COPY",
    "VFIO_PRECOPY_INFO_REINIT",
    "AuditReport",
    "Device",
    "Feature",
    "FeatureResult",
    "MigState",
    "PrecopyInfo",
    "SyncVfioClient",
    "VfioClient",
    "VfioClientError",
    "read_all",
    "uapi",
]
