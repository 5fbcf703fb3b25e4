"""The firmware's PAGE_TRACK object: the workload's DMA dirties guest pages in
the tracked ranges while the VF runs; a report returns and clears them."""

from __future__ import annotations

import pytest

from fwemu.link.ifc import CmdStatus, KiB, MiB, VfConfig
from fwemu.model import Firmware, VirtualClock
from fwemu.model.page_track import PageTrackError, PageTrackObject

GiB = 1 << 30


def make(rate: int = 1 * MiB) -> tuple[Firmware, int]:
    fw = Firmware(VirtualClock(), seed=2)
    (vf,) = fw.create_vfs(1, VfConfig(size=256 * KiB, dirty_bytes_per_s=rate))
    return fw, vf.vhca_id


def test_the_workload_dirties_tracked_pages_at_its_rate():
    """One guest page per workload page write, inside the ranges, page aligned."""
    fw, vhca = make()
    r = fw.create_page_tracker(vhca, [(0, GiB), (4 * GiB, GiB)], 12)
    assert r.ok, r
    fw.clock.advance(1.0)  # 256 writes of 4 KiB
    a = fw.report_page_tracker(vhca, r.obj_id, 0, GiB).dirty
    b = fw.report_page_tracker(vhca, r.obj_id, 4 * GiB, GiB).dirty
    assert 0 < len(a) + len(b) <= 256
    assert all(x % 4096 == 0 and 0 <= x < GiB for x in a)
    assert all(x % 4096 == 0 and 4 * GiB <= x < 5 * GiB for x in b)
    # Reported pages are clean again.
    assert fw.report_page_tracker(vhca, r.obj_id, 0, 8 * GiB).dirty == []


def test_no_dma_while_suspended():
    fw, vhca = make()
    r = fw.create_page_tracker(vhca, [(0, GiB)], 12)
    assert fw.suspend_vhca(vhca, 0).ok
    fw.clock.advance(2.0)
    assert fw.report_page_tracker(vhca, r.obj_id, 0, GiB).dirty == []


def test_same_seed_same_dirty_pages():
    runs = []
    for _ in range(2):
        fw, vhca = make()
        r = fw.create_page_tracker(vhca, [(0, GiB)], 16)
        fw.clock.advance(0.5)
        runs.append(fw.report_page_tracker(vhca, r.obj_id, 0, GiB).dirty)
    assert runs[0] == runs[1] and runs[0]


@pytest.mark.parametrize(
    ("ranges", "log_page"),
    [
        ([(0, GiB)], 11),  # page below 4 KiB
        ([(0, GiB)], 31),  # page above 1 GiB
        ([(1, GiB)], 12),  # unaligned start
        ([(0, GiB), (GiB // 2, GiB)], 12),  # overlap
        ([], 12),
        ([(i * GiB, 4096) for i in range(33)], 12),  # too many ranges
    ],
)
def test_bad_tracker_parameters_are_refused(ranges, log_page):
    fw, vhca = make()
    r = fw.create_page_tracker(vhca, ranges, log_page)
    assert r.status == CmdStatus.BAD_PARAM_ERR
    with pytest.raises(PageTrackError):
        PageTrackObject.create(1, ranges, log_page)


def test_one_tracker_per_function_and_destroy():
    fw, vhca = make()
    r = fw.create_page_tracker(vhca, [(0, GiB)], 12)
    assert fw.create_page_tracker(vhca, [(0, GiB)], 12).status == CmdStatus.RES_BUSY
    assert fw.destroy_page_tracker(vhca, r.obj_id).ok
    assert fw.destroy_page_tracker(vhca, r.obj_id).status == CmdStatus.BAD_RES_ERR
    assert fw.report_page_tracker(vhca, r.obj_id, 0, GiB).status == CmdStatus.BAD_RES_ERR


def test_tracking_needs_adv_virtualization():
    from fwemu.link.ifc import VfCaps as Caps

    fw = Firmware(VirtualClock())
    (vf,) = fw.create_vfs(1, VfConfig(size=64 * KiB, caps=Caps(adv_virtualization=False)))
    assert fw.create_page_tracker(vf.vhca_id, [(0, GiB)], 12).status == CmdStatus.BAD_OP_ERR
