"""Device DMA dirty tracking through VFIO_DEVICE_FEATURE: the core's checks of
vfio_ioctl_device_feature_logging_start / _stop / _report (drivers/vfio/vfio_main.c)
in front of the driver's vfio_log_ops."""

from __future__ import annotations

import errno

from .errors import VfioError
from .feature import vfio_check_feature
from .iova_bitmap import IovaBitmap
from .ops import VfioLogOps
from .uapi import (
    DMA_LOGGING_CONTROL,
    DMA_LOGGING_RANGE,
    DMA_LOGGING_REPORT,
    PAGE_SIZE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_SET,
)
from .usermem import UserArg, UserMemory

# The ranges must fit in one kernel page (LOG_MAX_RANGES).
LOG_MAX_RANGES = PAGE_SIZE // DMA_LOGGING_RANGE.size
# REPORT's page size floor is SZ_4K, whatever the kernel's PAGE_SIZE.
REPORT_MIN_PAGE_SIZE = 4096
U64_MAX = (1 << 64) - 1


def _checked(
    log_ops: VfioLogOps | None, flags: int, argsz: int, op: int, minsz: int
) -> VfioLogOps | None:
    """The checks each DMA logging feature begins with, in the kernel's order:
    no log_ops is -ENOTTY, then vfio_check_feature.  The ops to call, or None
    for a PROBE (answered, nothing more to do)."""
    if log_ops is None:
        raise VfioError(errno.ENOTTY, "device has no DMA logging (log_ops)")
    return log_ops if vfio_check_feature(flags, argsz, op, minsz) else None


async def logging_start(
    log_ops: VfioLogOps | None, flags: int, arg: UserArg, argsz: int, user: UserMemory
) -> None:
    """VFIO_DEVICE_FEATURE_DMA_LOGGING_START (SET).

    The ranges are read one by one from the user's array and each is checked
    before the next is read: alignment to page_size (-EINVAL; page_size itself
    is not validated, IS_ALIGNED just masks with page_size - 1), u64 overflow of
    iova + length (-EOVERFLOW), overlap with an earlier range (-EINVAL, as an
    interval-tree lookup of [iova, iova + length - 1]).  The driver gets the
    ranges in the tree's order (by iova) and may change page_size, which is
    copied back into the control struct.
    """
    ops = _checked(log_ops, flags, argsz, VFIO_DEVICE_FEATURE_SET, DMA_LOGGING_CONTROL.size)
    if ops is None:
        return
    page_size, num_ranges, reserved, ranges_addr = DMA_LOGGING_CONTROL.unpack(
        arg.copy_from(0, DMA_LOGGING_CONTROL.size)
    )
    if num_ranges == 0:
        raise VfioError(errno.EINVAL, "no ranges")
    if num_ranges > LOG_MAX_RANGES:
        raise VfioError(errno.E2BIG, f"{num_ranges} ranges, at most {LOG_MAX_RANGES}")

    align_mask = (page_size - 1) & U64_MAX
    nodes: list[tuple[int, int]] = []  # (start, last) as the interval tree holds them
    ranges: list[tuple[int, int]] = []
    for i in range(num_ranges):
        iova, length = DMA_LOGGING_RANGE.unpack(
            user.copy_from_user(ranges_addr + i * DMA_LOGGING_RANGE.size, DMA_LOGGING_RANGE.size)
        )
        if iova & align_mask or length & align_mask:
            raise VfioError(errno.EINVAL, f"range {i} not aligned to page size {page_size:#x}")
        if iova + length > U64_MAX:
            raise VfioError(errno.EOVERFLOW, f"range {i} wraps the address space")
        start, last = iova, (iova + length - 1) & U64_MAX
        if any(s <= last and start <= e for s, e in nodes):
            raise VfioError(errno.EINVAL, f"range {i} overlaps an earlier one")
        nodes.append((start, last))
        ranges.append((iova, length))

    ranges.sort(key=lambda r: r[0])  # stable: equal starts keep their order, as in the tree
    page_size = await ops.log_start(ranges, page_size)
    try:
        arg.copy_to(0, DMA_LOGGING_CONTROL.pack(page_size, num_ranges, reserved, ranges_addr))
    except VfioError:
        await ops.log_stop()
        raise


async def logging_stop(log_ops: VfioLogOps | None, flags: int, argsz: int) -> None:
    """VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP (SET, no data)."""
    ops = _checked(log_ops, flags, argsz, VFIO_DEVICE_FEATURE_SET, 0)
    if ops is None:
        return
    await ops.log_stop()


async def logging_report(
    log_ops: VfioLogOps | None, flags: int, arg: UserArg, argsz: int, user: UserMemory
) -> None:
    """VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT (GET).

    page_size must be a power of 2 of at least 4 KiB (-EINVAL) and iova + length
    must not wrap (-EOVERFLOW); nothing else is checked (a zero length reaches the
    driver).  iova_bitmap_for_each hands the driver the whole range in one call.
    """
    ops = _checked(log_ops, flags, argsz, VFIO_DEVICE_FEATURE_GET, DMA_LOGGING_REPORT.size)
    if ops is None:
        return
    iova, length, page_size, bitmap_addr = DMA_LOGGING_REPORT.unpack(
        arg.copy_from(0, DMA_LOGGING_REPORT.size)
    )
    if page_size < REPORT_MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise VfioError(errno.EINVAL, f"page size {page_size:#x}")
    if iova + length > U64_MAX:
        raise VfioError(errno.EOVERFLOW, "iova + length wraps the address space")
    bitmap = IovaBitmap(user, bitmap_addr, iova, length, page_size)
    await ops.log_read_and_clear(iova, length, bitmap)
