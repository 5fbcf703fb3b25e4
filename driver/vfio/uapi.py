"""Numbers and struct layouts of include/uapi/linux/vfio.h (migration part)."""

from __future__ import annotations

import enum
import struct


class MigState(enum.IntEnum):
    """enum vfio_device_mig_state."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


VFIO_DEVICE_STATE_NR = 8

# struct vfio_device_feature_migration.flags
VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2

# struct vfio_device_feature.flags
VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18


class Feature(enum.IntEnum):
    """VFIO_DEVICE_FEATURE_* indexes."""

    PCI_VF_TOKEN = 0
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    LOW_POWER_ENTRY = 3
    LOW_POWER_ENTRY_WITH_WAKEUP = 4
    LOW_POWER_EXIT = 5
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    MIG_DATA_SIZE = 9
    BUS_MASTER = 10
    DMA_BUF = 11
    MIG_PRECOPY_INFOv2 = 12


# struct vfio_precopy_info.flags (output, after the MIG_PRECOPY_INFOv2 opt-in)
VFIO_PRECOPY_INFO_REINIT = 1 << 0

# ioctl numbers: _IO(VFIO_TYPE ';', VFIO_BASE + n)
VFIO_TYPE = 0x3B
VFIO_BASE = 100
VFIO_DEVICE_FEATURE = (VFIO_TYPE << 8) | (VFIO_BASE + 17)  # 0x3B75
VFIO_MIG_GET_PRECOPY_INFO = (VFIO_TYPE << 8) | (VFIO_BASE + 21)  # 0x3B79

# Struct layouts (little endian, as on x86-64 and arm64).
FEATURE_HEADER = struct.Struct("<II")  # argsz, flags
MIGRATION = struct.Struct("<Q")  # flags
MIG_STATE = struct.Struct("<Ii")  # device_state, data_fd
MIG_DATA_SIZE = struct.Struct("<Q")  # stop_copy_length
DMA_LOGGING_CONTROL = struct.Struct("<QIIQ")  # page_size, num_ranges, __reserved, ranges
DMA_LOGGING_RANGE = struct.Struct("<QQ")  # iova, length
DMA_LOGGING_REPORT = struct.Struct("<QQQQ")  # iova, length, page_size, bitmap
PRECOPY_INFO = struct.Struct("<IIQQ")  # argsz, flags, initial_bytes, dirty_bytes

# The host's page size, which the VFIO uAPI is written in (DMA logging's range
# limit, its bitmap pages); firmware pages are fwemu.link.ifc.PAGE_SIZE.
PAGE_SIZE = 4096
