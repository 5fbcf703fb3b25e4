"""Clients of the vfio-driver service: a library that reads like ioctl code.

`VfioClient` (asyncio) and `SyncVfioClient` (blocking: scripts, threads,
gevent) make the same calls (vfioclient.calls); `vfioclient.uapi` holds the
numbers and struct layouts of linux/vfio.h that such code uses.

The names below are imported on first use (PEP 562): `import vfioclient.uapi`
or the `vfioctl` command does not pay for grpc and the protobuf stubs of the
clients it does not use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Each name of __all__ -> the submodule that defines it (a submodule's own
# name: the module itself).
_EXPORTS = {
    "VFIO_DEVICE_FEATURE_GET": "uapi",
    "VFIO_DEVICE_FEATURE_PROBE": "uapi",
    "VFIO_DEVICE_FEATURE_SET": "uapi",
    "VFIO_MIGRATION_P2P": "uapi",
    "VFIO_MIGRATION_PRE_COPY": "uapi",
    "VFIO_MIGRATION_STOP_COPY": "uapi",
    "VFIO_PRECOPY_INFO_REINIT": "uapi",
    "AuditReport": "calls",
    "Device": "calls",
    "Feature": "uapi",
    "FeatureResult": "calls",
    "MigState": "uapi",
    "PrecopyInfo": "calls",
    "SyncVfioClient": "sync",
    "VfioClient": "client",
    "VfioClientError": "calls",
    "read_all": "client",
    "uapi": "uapi",
}

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


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{where}", __name__)
    value = module if where == name else getattr(module, name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
