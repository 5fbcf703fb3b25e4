"""The uAPI enums of vfio.proto hold the values of include/uapi/linux/vfio.h
(driver/vfio/uapi.py, which the driver itself runs on): a client that takes
its constants from the proto sends what an ioctl caller sends."""

from __future__ import annotations

from driver.api.v1 import vfio_pb2 as pb
from driver.vfio import dma_logging, uapi


def values(enum_name: str, prefix: str) -> dict[str, int]:
    enum = pb.DESCRIPTOR.enum_types_by_name[enum_name]
    return {v.name.removeprefix(prefix): v.number for v in enum.values}


def test_device_features_are_the_kernels() -> None:
    kernel = {f.name.upper(): f.value for f in uapi.Feature}
    assert values("DeviceFeature", "DEVICE_FEATURE_") == kernel


def test_feature_flags_are_the_kernels() -> None:
    assert values("DeviceFeatureFlag", "DEVICE_FEATURE_FLAG_") == {
        "UNSPECIFIED": 0,
        "MASK": uapi.VFIO_DEVICE_FEATURE_MASK,
        "GET": uapi.VFIO_DEVICE_FEATURE_GET,
        "SET": uapi.VFIO_DEVICE_FEATURE_SET,
        "PROBE": uapi.VFIO_DEVICE_FEATURE_PROBE,
    }


def test_migration_states_are_the_kernels() -> None:
    kernel = {s.name: s.value for s in uapi.MigState}
    assert values("DeviceMigState", "DEVICE_MIG_STATE_") == kernel
    assert len(kernel) == uapi.VFIO_DEVICE_STATE_NR


def test_migration_and_precopy_flags_are_the_kernels() -> None:
    assert values("MigrationFlag", "MIGRATION_FLAG_") == {
        "UNSPECIFIED": 0,
        "STOP_COPY": uapi.VFIO_MIGRATION_STOP_COPY,
        "P2P": uapi.VFIO_MIGRATION_P2P,
        "PRE_COPY": uapi.VFIO_MIGRATION_PRE_COPY,
    }
    assert values("PrecopyInfoFlag", "PRECOPY_INFO_FLAG_") == {
        "UNSPECIFIED": 0,
        "REINIT": uapi.VFIO_PRECOPY_INFO_REINIT,
    }


def test_dma_logging_limits_are_the_cores() -> None:
    assert values("DmaLoggingLimit", "DMA_LOGGING_LIMIT_") == {
        "UNSPECIFIED": 0,
        "MAX_RANGES": dma_logging.LOG_MAX_RANGES,
        "MIN_PAGE_SIZE": dma_logging.REPORT_MIN_PAGE_SIZE,
    }
