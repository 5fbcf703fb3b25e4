"""Dirty page tracking of a VF's DMA into guest memory: the firmware's
PAGE_TRACK general object that mlx5vf creates for VFIO DMA logging, and the
general object commands that create, report (MODIFY) and destroy it.

The device writes guest memory while it runs; here every page write of the
workload also writes one guest page inside the tracked ranges, chosen from the
write's counter, so a QEMU-like client sees the device dirty its memory at the
workload's rate.  The real device reports dirty addresses through a QP; here a
report returns them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..link.ifc import (
    LOG_MAX_ADDR_SPACE,
    LOG_MAX_PAGE_SIZE,
    LOG_MIN_ADDR_SPACE,
    LOG_MIN_PAGE_SIZE,
    MAX_NUM_RANGES,
    CmdResult,
    CmdStatus,
    CreatePageTrackIn,
    DestroyPageTrackIn,
    ModifyPageTrackIn,
    PageTrackResult,
    Syndrome,
)

if TYPE_CHECKING:
    from .state import FirmwareState
    from .vf import Vf


class PageTrackError(ValueError):
    pass


@dataclass
class PageTrackObject:
    obj_id: int
    ranges: list[tuple[int, int]]  # (start address, length), sorted, page aligned
    page_size: int
    dirty: set[int] = field(default_factory=set)  # page-aligned guest addresses

    def __post_init__(self) -> None:
        self._pages = [length // self.page_size for _, length in self.ranges]

    @classmethod
    def create(
        cls, obj_id: int, ranges: list[tuple[int, int]], log_page_size: int
    ) -> PageTrackObject:
        """CREATE_GENERAL_OBJECT(PAGE_TRACK): the checks the firmware makes."""
        if not LOG_MIN_PAGE_SIZE <= log_page_size <= LOG_MAX_PAGE_SIZE:
            raise PageTrackError(
                f"log_page_size {log_page_size} outside [{LOG_MIN_PAGE_SIZE}, {LOG_MAX_PAGE_SIZE}]"
            )
        if not 1 <= len(ranges) <= MAX_NUM_RANGES:
            raise PageTrackError(f"{len(ranges)} ranges, 1 to {MAX_NUM_RANGES} allowed")
        page = 1 << log_page_size
        ranges = sorted(ranges)
        end = -1
        for start, length in ranges:
            if length <= 0 or start % page or length % page or start < end:
                raise PageTrackError(f"range {start:#x}+{length:#x} unaligned or overlapping")
            end = start + length
        total = sum(length for _, length in ranges)
        if not LOG_MIN_ADDR_SPACE <= (total - 1).bit_length() <= LOG_MAX_ADDR_SPACE:
            raise PageTrackError("address space size out of the tracker's range")
        return cls(obj_id, ranges, page)

    def device_wrote(self, page: int, counter: int) -> None:
        """The device's DMA for one workload write lands on one guest page."""
        i = counter % len(self.ranges)
        start, _ = self.ranges[i]
        n = self._pages[i]
        self.dirty.add(start + ((page * 2654435761 + counter) % n) * self.page_size)

    def report(self, iova: int, length: int) -> list[int]:
        """MODIFY to REPORTING for [iova, iova + length): the dirty addresses
        there, which are clean again afterwards."""
        hit = sorted(a for a in self.dirty if iova <= a < iova + length)
        self.dirty.difference_update(hit)
        return hit


def create_page_track(fw: FirmwareState, vf: Vf, cmd: CreatePageTrackIn) -> PageTrackResult:
    if not vf.config.caps.adv_virtualization:
        return cmd.result(
            CmdStatus.BAD_OP_ERR,
            Syndrome.CAP_MISSING,
            "page tracking needs cmd_hca_cap.adv_virtualization",
        )
    if vf.page_trackers:
        return cmd.result(
            CmdStatus.RES_BUSY, Syndrome.MIGRATION_BUSY, "the function already has a page tracker"
        )
    try:
        obj = PageTrackObject.create(next(fw.ids), list(cmd.ranges), cmd.log_page_size)
    except PageTrackError as e:
        return cmd.result(CmdStatus.BAD_PARAM_ERR, Syndrome.FIELD_RANGE, str(e))
    vf.page_trackers[obj.obj_id] = obj
    return PageTrackResult(obj_id=obj.obj_id)


def modify_page_track(fw: FirmwareState, vf: Vf, cmd: ModifyPageTrackIn) -> PageTrackResult:
    obj = vf.page_trackers.get(cmd.obj_id)
    if obj is None:
        return cmd.result(
            CmdStatus.BAD_RES_ERR, Syndrome.FIELD_RANGE, f"no page tracker {cmd.obj_id}"
        )
    return PageTrackResult(obj_id=cmd.obj_id, dirty=obj.report(cmd.range_start_address, cmd.length))


def destroy_page_track(fw: FirmwareState, vf: Vf, cmd: DestroyPageTrackIn) -> CmdResult:
    if vf.page_trackers.pop(cmd.obj_id, None) is None:
        return cmd.result(
            CmdStatus.BAD_RES_ERR, Syndrome.FIELD_RANGE, f"no page tracker {cmd.obj_id}"
        )
    return CmdResult()
