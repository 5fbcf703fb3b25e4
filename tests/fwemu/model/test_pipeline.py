"""The firmware's one command path: every command, whatever its opcode, is
counted by opcode and status and logged when it fails (mlx5_cmd_exec() is the
one path of every command in the kernel too)."""

from __future__ import annotations

import logging

import pytest

from fwemu.link.ifc import (
    FLR_OPCODE,
    CmdStatus,
    Fault,
    FaultKind,
    KiB,
    Opcode,
    SuspendVhcaIn,
    Syndrome,
    VfConfig,
)
from fwemu.model import Firmware, VirtualClock


@pytest.fixture
def fw() -> Firmware:
    f = Firmware(VirtualClock(), seed=1)
    f.create_vfs(1, VfConfig(size=64 * KiB, dirty_bytes_per_s=0))
    return f


def test_every_opcode_is_counted_by_status(fw: Firmware) -> None:
    buf = bytearray(4096)
    mkey = fw.create_mkey(memoryview(buf)).mkey
    assert fw.destroy_mkey(mkey).ok
    assert fw.query_hca_cap(0, True, 1).ok
    assert fw.query_hca_cap(0x7F, True, 1).status == CmdStatus.BAD_PARAM_ERR
    obj = fw.create_page_tracker(1, [(0, 1 << 20)], 12).obj_id
    assert fw.report_page_tracker(1, obj, 0, 1 << 20).ok
    assert fw.destroy_page_tracker(1, obj).ok
    assert fw.destroy_page_tracker(1, obj).status == CmdStatus.BAD_RES_ERR
    assert fw.function_level_reset(1).ok
    ok, bad_param, bad_res = CmdStatus.OK, CmdStatus.BAD_PARAM_ERR, CmdStatus.BAD_RES_ERR
    assert fw.stats.commands == {
        (Opcode.CREATE_MKEY, ok): 1,
        (Opcode.DESTROY_MKEY, ok): 1,
        (Opcode.QUERY_HCA_CAP, ok): 1,
        (Opcode.QUERY_HCA_CAP, bad_param): 1,
        (Opcode.CREATE_GENERAL_OBJECT, ok): 1,
        (Opcode.MODIFY_GENERAL_OBJECT, ok): 1,
        (Opcode.DESTROY_GENERAL_OBJECT, ok): 1,
        (Opcode.DESTROY_GENERAL_OBJECT, bad_res): 1,
        (FLR_OPCODE, ok): 1,
    }


def test_a_failed_command_is_logged_with_its_opcode(
    fw: Firmware, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fwemu.firmware"):
        fw.destroy_page_tracker(1, 99)
    [rec] = [r for r in caplog.records if r.getMessage().startswith("command failed")]
    assert rec.__dict__["opcode"] == "DESTROY_GENERAL_OBJECT"
    assert rec.__dict__["syndrome"] == "FIELD_RANGE"
    assert rec.__dict__["vhca_id"] == 1


def test_exec_runs_an_in_struct_as_its_facade_method_does(fw: Firmware) -> None:
    fw.inject_fault(1, Fault(FaultKind.FAIL, Opcode.SUSPEND_VHCA, syndrome=Syndrome.INJECTED))
    r = fw.exec(SuspendVhcaIn(1, 0))
    assert (r.status, r.syndrome, r.diagnostic) == (
        CmdStatus.INT_ERR,
        Syndrome.INJECTED,
        "injected fault",
    )
    assert fw.exec(SuspendVhcaIn(1, 0)).ok
    assert not fw.vfs[1].running


def test_faults_stay_on_the_migration_commands(fw: Firmware) -> None:
    """Fault.validate: FAIL and DELAY faults name one of the five migration opcodes."""
    with pytest.raises(ValueError, match="not a migration command"):
        Fault(FaultKind.FAIL, Opcode.CREATE_GENERAL_OBJECT).validate()
    with pytest.raises(ValueError, match="not a migration command"):
        Fault(FaultKind.DELAY, FLR_OPCODE, delay_s=1).validate()
