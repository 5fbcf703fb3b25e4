"""mlx5vf's dirty page tracker (vfio_log_ops, drivers/vfio/pci/mlx5/cmd.c):
a PAGE_TRACK object in the firmware over the ranges the user asked for."""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING

from fwemu.link.ifc import (
    LOG_MAX_ADDR_SPACE,
    LOG_MAX_PAGE_SIZE,
    LOG_MIN_ADDR_SPACE,
    LOG_MIN_PAGE_SIZE,
    MAX_NUM_RANGES,
)

from ..vfio.errors import VfioError
from ..vfio.ops import IovaBitmap

if TYPE_CHECKING:
    from .main import Mlx5VfDevice


def combine_iova_ranges(ranges: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """vfio_combine_iova_ranges(): merge the ranges separated by the smallest
    gaps until at most `limit` remain."""
    spans = sorted((start, start + length) for start, length in ranges)
    while len(spans) > limit:
        i = min(range(len(spans) - 1), key=lambda k: spans[k + 1][0] - spans[k][1])
        spans[i : i + 2] = [(spans[i][0], spans[i + 1][1])]
    return [(start, end - start) for start, end in spans]


class VhcaPageTracker:
    """struct mlx5_vhca_page_tracker: the log ops of one mlx5 VF."""

    def __init__(self, mvdev: Mlx5VfDevice) -> None:
        self.mvdev = mvdev
        self.obj_id: int | None = None
        self.page_size = 0
        self.is_err = False

    @property
    def log_active(self) -> bool:
        return self.obj_id is not None

    async def log_start(self, ranges: list[tuple[int, int]], page_size: int) -> int:
        """mlx5vf_start_page_tracker()."""
        mvdev = self.mvdev
        async with mvdev.state_mutex:
            if mvdev.mdev_detach:
                raise VfioError(errno.ENOTCONN, "the VF is detached")
            if self.log_active:
                raise VfioError(errno.EINVAL, "dirty tracking is already active")
            log_page = max(page_size.bit_length() - 1, 0)
            log_page = min(max(log_page, LOG_MIN_PAGE_SIZE), LOG_MAX_PAGE_SIZE)
            if len(ranges) > MAX_NUM_RANGES:
                ranges = combine_iova_ranges(ranges, MAX_NUM_RANGES)
            total = sum(length for _, length in ranges)
            log_space = (total - 1).bit_length()  # ilog2(roundup_pow_of_two(total))
            if not LOG_MIN_ADDR_SPACE <= log_space <= LOG_MAX_ADDR_SPACE:
                raise VfioError(errno.EOPNOTSUPP, "tracked address space out of range")
            page = 1 << log_page
            # The firmware tracks whole pages of its page size.
            aligned = [
                (start - start % page, -(-(start + length) // page) * page - (start - start % page))
                for start, length in ranges
            ]
            ranges = combine_iova_ranges(aligned, MAX_NUM_RANGES)
            r = await mvdev.cmds.exec(
                "CREATE_GENERAL_OBJECT(PAGE_TRACK)",
                lambda: mvdev.link.create_page_tracker(mvdev.caps.vhca_id, ranges, log_page),
            )
            self.obj_id, self.page_size, self.is_err = r.obj_id, page, False
            return page

    async def log_stop(self) -> None:
        """mlx5vf_stop_page_tracker(): always succeeds."""
        async with self.mvdev.state_mutex:
            await self.free()

    async def free(self) -> None:
        mvdev = self.mvdev
        obj_id, self.obj_id = self.obj_id, None
        if obj_id is not None and not mvdev.mdev_detach:
            # Stopping always succeeds: a firmware that went away has nothing
            # left to destroy.
            with contextlib.suppress(VfioError):
                await mvdev.cmds.exec(
                    "DESTROY_GENERAL_OBJECT(PAGE_TRACK)",
                    lambda: mvdev.link.destroy_page_tracker(mvdev.caps.vhca_id, obj_id),
                    check=False,
                )

    async def log_read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        """mlx5vf_tracker_read_and_clear()."""
        mvdev = self.mvdev
        async with mvdev.state_mutex:
            if mvdev.mdev_detach:
                raise VfioError(errno.ENOTCONN, "the VF is detached")
            if self.obj_id is None:
                raise VfioError(errno.EINVAL, "dirty tracking is not active")
            if self.is_err:
                raise VfioError(errno.EIO, "the tracker is in error")
            obj_id = self.obj_id
            try:
                # The status is checked here: any failure is the tracker's error (EIO).
                r = await mvdev.cmds.exec(
                    "MODIFY_GENERAL_OBJECT(PAGE_TRACK)",
                    lambda: mvdev.link.report_page_tracker(
                        mvdev.caps.vhca_id, obj_id, iova, length
                    ),
                    check=False,
                )
            except VfioError:
                self.is_err = True
                raise
            if not r.ok:
                self.is_err = True
                raise VfioError(errno.EIO, f"tracker report failed: {r.diagnostic}")
            for addr in r.dirty:
                bitmap.set(addr, self.page_size)
