"""ResetVf (issue 13): a VF back to the state it was created in, with its config
and seed; scheduled reconfigurations and faults dropped; a migration of it
ended as by an FLR (a SAVE in flight completes INT_ERR / ABORTED); its uid,
counters and DMA page trackers kept.  All or nothing."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fwemu.link.ifc import (
    CmdStatus,
    Fault,
    FaultKind,
    KiB,
    Opcode,
    QueryVhcaMigState,
    ReconfigMode,
    SaveCompletion,
    Syndrome,
    VfConfig,
)
from fwemu.link.scenario_requests import ResetVfIn
from fwemu.model import Firmware, VirtualClock
from fwemu.model.memory import OutOfMemory
from tests.support.fwemu_model import FailingAllocator, load_bytes, save_image, suspend_fully

LIVE = VfConfig(
    size=128 * KiB,
    seed=99,
    dirty_bytes_per_s=64 * KiB,
    reconfig_bytes=8 * KiB,
    reconfig_rate_per_s=20.0,
)


def test_a_reset_vf_equals_a_fresh_one_now_and_as_time_passes() -> None:
    """Reconfigured in every mode, run, reconfigured by ConfigureVf: after the
    reset its digest is a new VF's of the same config and seed, and stays so
    as the workload and the automatic reconfigurations go on."""
    fw = Firmware(VirtualClock(), seed=1)
    [vf] = fw.create_vfs(1, LIVE)
    for mode in ReconfigMode:
        fw.reconfigure(vf.vhca_id, [(0, 40 * KiB)], mode=mode)
    fw.advance_clock(2.5)
    fw.configure_vf(vf.vhca_id, dirty_bytes_per_s=32 * KiB, reconfig_rate_per_s=7.0)
    fw.advance_clock(1.0)
    assert fw.touch(vf.vhca_id).state.size > LIVE.size  # the ADD grew it
    assert fw.control(ResetVfIn(vf.vhca_id)).state_size == LIVE.size
    [fresh] = fw.create_vfs(1, vf.config)
    assert fw.digest(vf.vhca_id) == fw.digest(fresh.vhca_id)
    for _ in range(20):
        fw.advance_clock(0.25)
        assert fw.digest(vf.vhca_id) == fw.digest(fresh.vhca_id)
    assert fw.info(fresh.vhca_id).reconfigurations > 0


def test_a_reset_drops_scheduled_reconfigurations_and_armed_faults() -> None:
    fw = Firmware(VirtualClock(), seed=1)
    [vf] = fw.create_vfs(1, replace(LIVE, dirty_bytes_per_s=0, reconfig_rate_per_s=0.0))
    fw.reconfigure(vf.vhca_id, at_time=1.0)
    fw.reconfigure(vf.vhca_id, after_saved_bytes=1)
    fw.inject_fault(vf.vhca_id, Fault(FaultKind.FAIL, Opcode.SUSPEND_VHCA, status=5))
    fw.inject_fault(vf.vhca_id, Fault(FaultKind.TRACKING_LOST))
    fw.reset_vf(vf.vhca_id)
    assert vf.triggers == [] and vf.faults.faults == []
    digest = fw.digest(vf.vhca_id)
    fw.advance_clock(2.0)
    assert fw.digest(vf.vhca_id) == digest
    save_image(fw, vf.vhca_id)  # saved bytes, and tracking
    assert fw.digest(vf.vhca_id) == digest and vf.reconfigurations == 0
    assert fw.suspend_vhca(vf.vhca_id, 0).ok
    assert vf.migration_state() == QueryVhcaMigState.OPER_MIGRATION_IDLE  # not lost


def test_a_reset_keeps_the_uid_counters_config_and_page_trackers() -> None:
    fw = Firmware(VirtualClock(), seed=1)
    [vf] = fw.create_vfs(1, LIVE)
    tracker = fw.create_page_tracker(vf.vhca_id, [(0, 1 << 20)], 12)
    save_image(fw, vf.vhca_id)
    fw.reconfigure(vf.vhca_id)
    fw.configure_vf(vf.vhca_id, save_latency_s=0.5)
    before = fw.info(vf.vhca_id)
    after = fw.info(fw.reset_vf(vf.vhca_id).vhca_id)
    assert (after.uid, after.saved_bytes, after.reconfigurations) == (
        before.uid,
        before.saved_bytes,
        before.reconfigurations,
    )
    assert after.config == before.config
    fw.advance_clock(0.5)
    assert fw.report_page_tracker(vf.vhca_id, tracker.obj_id, 0, 1 << 20).ok


def test_a_reset_during_a_save_aborts_it_and_ends_tracking() -> None:
    """As on removal or FLR: the SAVE in flight completes with INT_ERR /
    ABORTED (its own completion never comes), tracking ends (UNINITIALIZED;
    an incremental SAVE gets NO_TRACKING)."""
    fw = Firmware(VirtualClock(), seed=1)
    [vf] = fw.create_vfs(1, replace(LIVE, save_latency_s=1.0))
    got: list[SaveCompletion] = []
    fw.subscribe(got.append)
    save_image(fw, vf.vhca_id)  # tracking (its completion waits for the clock)
    fw.advance_clock(1.0)
    got.clear()
    q = fw.query_vhca_migration_state(vf.vhca_id, incremental=True)
    buf = bytearray(max(q.required_umem_size, 4096))
    mkey = fw.create_mkey(memoryview(buf)).mkey
    assert fw.save_vhca_state(
        vf.vhca_id, incremental=True, set_track=True, mkey=mkey, size=len(buf)
    ).ok
    fw.reset_vf(vf.vhca_id)
    assert [(c.status, c.syndrome) for c in got] == [(CmdStatus.INT_ERR, Syndrome.ABORTED)]
    fw.advance_clock(2.0)
    assert len(got) == 1  # the aborted SAVE does not complete again
    assert vf.migration_state() == QueryVhcaMigState.UNINITIALIZED
    r = fw.save_vhca_state(vf.vhca_id, incremental=True, set_track=True, mkey=mkey, size=len(buf))
    assert (r.status, r.syndrome) == (CmdStatus.BAD_RES_STATE_ERR, Syndrome.NO_TRACKING)


def test_a_reset_of_a_suspended_destination_runs_it_and_ends_its_load_chain() -> None:
    """A destination in the middle of its loads: after the reset it runs (as
    created) and the next image of the chain is out of order."""
    fw = Firmware(VirtualClock(), seed=1)
    src, dst = (v.vhca_id for v in fw.create_vfs(2, replace(LIVE, reconfig_rate_per_s=0.0)))
    suspend_fully(fw, dst)
    assert load_bytes(fw, dst, save_image(fw, src)).ok
    fw.advance_clock(0.5)
    increment = save_image(fw, src, incremental=True)
    fw.reset_vf(dst)
    d = fw.vf(dst)
    assert d.running and d.load_chain is None
    suspend_fully(fw, dst)
    r = load_bytes(fw, dst, increment)
    assert (r.status, r.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.IMAGE_OUT_OF_ORDER)


def test_a_reset_without_memory_for_the_state_changes_nothing() -> None:
    """A VF that loaded the image of a smaller one must grow back to its size:
    without memory, OutOfMemory and nothing changed (its SAVE in flight goes
    on, its faults stay armed)."""
    alloc = FailingAllocator()
    fw = Firmware(VirtualClock(), seed=1, allocator=alloc)
    quiet = replace(LIVE, reconfig_rate_per_s=0.0, dirty_bytes_per_s=0, save_latency_s=1.0)
    [small] = fw.create_vfs(1, replace(quiet, size=16 * KiB, save_latency_s=0.0))
    [big] = fw.create_vfs(1, quiet)
    suspend_fully(fw, big.vhca_id)
    assert load_bytes(fw, big.vhca_id, save_image(fw, small.vhca_id)).ok
    for op_mod in (0, 1):
        assert fw.resume_vhca(big.vhca_id, op_mod).ok
    assert big.state.size == 16 * KiB
    fw.inject_fault(big.vhca_id, Fault(FaultKind.TRACKING_LOST))
    save_image(fw, big.vhca_id)  # in flight for a second

    def snapshot() -> tuple[object, ...]:
        return fw.info(big.vhca_id), fw.digest(big.vhca_id), big.save_in_flight, big.faults.faults

    before = snapshot()
    alloc.arm(MemoryError())
    with pytest.raises(OutOfMemory):
        fw.reset_vf(big.vhca_id)
    alloc.fail = 0
    assert snapshot() == before and big.tracking
    fw.reset_vf(big.vhca_id)
    assert fw.digest(big.vhca_id) == fw.digest(fw.create_vfs(1, quiet)[0].vhca_id)
