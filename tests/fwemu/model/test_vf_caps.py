"""Per-VF caps on what scenario clients leave queued (issue 11): armed faults
and pending reconfigurations stop at MAX_ARMED_FAULTS / MAX_PENDING_TRIGGERS
with LimitReached naming the cap, and a refusal changes nothing (no fault, no
trigger, no id drawn)."""

from __future__ import annotations

import pytest

from fwemu.link.ifc import Fault, FaultKind, FirmwareError, KiB, Opcode
from fwemu.model import Firmware, VirtualClock
from fwemu.model.limits import MAX_ARMED_FAULTS, MAX_PENDING_TRIGGERS, LimitReached


@pytest.fixture
def fw() -> Firmware:
    fw = Firmware(VirtualClock(), seed=7)
    fw.create_vfs(2, None)
    return fw


def _fail() -> Fault:
    return Fault(FaultKind.FAIL, Opcode.SUSPEND_VHCA, status=0x3)


def test_limit_reached_is_a_firmware_error() -> None:
    assert issubclass(LimitReached, FirmwareError)


def test_armed_faults_stop_at_the_cap_and_the_refusal_changes_nothing(fw: Firmware) -> None:
    ids = [fw.inject_fault(1, _fail()) for _ in range(MAX_ARMED_FAULTS)]
    assert len(set(ids)) == MAX_ARMED_FAULTS
    before = list(fw.vf(1).faults.faults)
    with pytest.raises(LimitReached, match=f"at most {MAX_ARMED_FAULTS} armed faults"):
        fw.inject_fault(1, _fail())
    assert fw.vf(1).faults.faults == before
    # No id was drawn for the refused fault: the next accepted one follows on.
    assert fw.inject_fault(2, _fail()) == ids[-1] + 1
    # The cap is per VF, and consuming a fault makes room again.
    assert fw.clear_faults(1) == MAX_ARMED_FAULTS
    fw.inject_fault(1, _fail())


def test_a_fault_with_bad_fields_draws_no_id(fw: Firmware) -> None:
    first = fw.inject_fault(1, _fail())
    with pytest.raises(FirmwareError):
        fw.inject_fault(1, Fault(FaultKind.FAIL, Opcode.SUSPEND_VHCA, status=0))
    assert fw.inject_fault(1, _fail()) == first + 1


def test_pending_reconfigurations_stop_at_the_cap(fw: Firmware) -> None:
    vf = fw.vf(1)
    objects_before = len(vf.state.objects)
    ids = [
        fw.reconfigure(1, [(0, 4 * KiB)], after_saved_bytes=1 << 40)
        for _ in range(MAX_PENDING_TRIGGERS)
    ]
    before = list(vf.triggers)
    with pytest.raises(LimitReached, match=f"at most {MAX_PENDING_TRIGGERS} pending"):
        fw.reconfigure(1, [(0, 4 * KiB)], at_time=fw.clock.now() + 10.0)
    assert vf.triggers == before
    assert len(vf.state.objects) == objects_before
    assert fw.reconfigure(2, [(0, 4 * KiB)], after_saved_bytes=1 << 40) == ids[-1] + 1


def test_a_full_queue_still_takes_a_reconfiguration_that_runs_now(fw: Firmware) -> None:
    """Only what would wait counts: one due now on a running VF is no trigger."""
    vf = fw.vf(1)
    for _ in range(MAX_PENDING_TRIGGERS):
        fw.reconfigure(1, [(0, 4 * KiB)], after_saved_bytes=1 << 40)
    n = vf.reconfigurations
    fw.reconfigure(1, [(0, 4 * KiB)])
    assert vf.reconfigurations == n + 1
    assert len(vf.triggers) == MAX_PENDING_TRIGGERS


def test_triggers_that_fired_make_room(fw: Firmware) -> None:
    clock = fw.clock
    assert isinstance(clock, VirtualClock)
    for _ in range(MAX_PENDING_TRIGGERS):
        fw.reconfigure(1, [(0, 1 * KiB)], at_time=clock.now() + 1.0)
    clock.advance(2.0)
    # The due triggers run as the request brings the VF to now, before the cap is checked.
    fw.reconfigure(1, [(0, 1 * KiB)], at_time=clock.now() + 1.0)
    assert len(fw.vf(1).triggers) == 1
    assert fw.vf(1).reconfigurations == MAX_PENDING_TRIGGERS
