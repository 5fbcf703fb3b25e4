"""The firmware's one command path (what mlx5_cmd_exec() reaches): every
command goes through `exec_command`, which finds the addressed function,
applies injected faults (FAIL, DELAY), runs the command, counts it by opcode
and status, and logs a failure."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ..link import ifc
from ..link.ifc import (
    MAX_U16,
    CmdResult,
    CmdStatus,
    Command,
    Fault,
    FaultKind,
    R,
    Syndrome,
    VhcaCommand,
    enum_name,
    opcode_name,
)
from . import load, mkeys, page_track, query, save, suspend

if TYPE_CHECKING:
    from .state import FirmwareState
    from .vf import Vf


log = logging.getLogger("fwemu.firmware")

# Commands that name no function (their handler finds what they address).
_UNADDRESSED: dict[type[Command[Any]], Callable[[FirmwareState, Any], CmdResult]] = {
    ifc.QueryHcaCapIn: query.query_hca_cap,
    ifc.CreateMkeyIn: mkeys.create_mkey,
    ifc.DestroyMkeyIn: mkeys.destroy_mkey,
}

# Commands addressed by vhca_id: the handler, and whether the function must be
# able to migrate (an FLR reaches any function).
_ADDRESSED: dict[type[Command[Any]], tuple[Callable[[FirmwareState, Vf, Any], CmdResult], bool]] = {
    ifc.SuspendVhcaIn: (suspend.suspend_vhca, True),
    ifc.ResumeVhcaIn: (suspend.resume_vhca, True),
    ifc.QueryVhcaMigrationStateIn: (query.query_vhca_migration_state, True),
    ifc.SaveVhcaStateIn: (save.save_vhca_state, True),
    ifc.LoadVhcaStateIn: (load.load_vhca_state, True),
    ifc.CreatePageTrackIn: (page_track.create_page_track, True),
    ifc.ModifyPageTrackIn: (page_track.modify_page_track, True),
    ifc.DestroyPageTrackIn: (page_track.destroy_page_track, True),
    ifc.FunctionLevelResetIn: (suspend.function_level_reset, False),
}


def exec_command(fw: FirmwareState, cmd: Command[R]) -> R:
    vf: Vf | None = None
    result: CmdResult
    if isinstance(cmd, VhcaCommand):
        handler, migration = _ADDRESSED[type(cmd)]
        found = _lookup(fw, cmd.vhca_id, migration)
        if isinstance(found, CmdResult):
            result = cmd.result(found.status, found.syndrome, found.diagnostic)
        else:
            vf = found
            result = _injected(vf, cmd) or handler(fw, vf, cmd)
            delay = vf.faults.take(FaultKind.DELAY, cmd.opcode)
            if delay is not None:
                result.delay_s += delay.delay_s
    else:
        result = _UNADDRESSED[type(cmd)](fw, cmd)
    key = (cmd.opcode, result.status)
    fw.stats.commands[key] = fw.stats.commands.get(key, 0) + 1
    if not result.ok:
        log.info(
            "command failed: %s",
            result.diagnostic,
            extra={
                "vhca_id": vf.vhca_id if vf is not None else None,
                "opcode": opcode_name(cmd.opcode),
                "status": enum_name(CmdStatus, result.status),
                "syndrome": enum_name(Syndrome, result.syndrome),
            },
        )
    return cast(R, result)


def _lookup(fw: FirmwareState, vhca_id: int, migration: bool) -> Vf | CmdResult:
    # A reset is no mailbox command: it names any function, with no 16-bit field.
    if migration and not 0 <= vhca_id <= MAX_U16:
        return CmdResult(
            CmdStatus.BAD_PARAM_ERR, Syndrome.FIELD_RANGE, f"vhca_id {vhca_id} does not fit 16 bits"
        )
    vf = fw.vfs.get(vhca_id)
    if vf is None:
        return CmdResult(
            CmdStatus.BAD_PARAM_ERR, Syndrome.UNKNOWN_VHCA, f"no function with vhca_id {vhca_id}"
        )
    if migration and not vf.config.caps.migration_capable():
        return CmdResult(
            CmdStatus.BAD_OP_ERR,
            Syndrome.NOT_MIGRATABLE,
            f"vhca_id {vhca_id} does not support migration",
        )
    vf.advance(fw.clock.now())
    return vf


def _injected(vf: Vf, cmd: Command[R]) -> R | None:
    """A FAIL fault for this opcode turns the command into that failure."""
    f = vf.faults.take(FaultKind.FAIL, cmd.opcode)
    if f is None:
        return None
    if f.in_completion:
        # Only SAVE: put one back for save_vhca_state to fail the completion with.
        vf.faults.faults.insert(
            0,
            Fault(
                FaultKind.FAIL,
                cmd.opcode,
                f.status,
                f.syndrome,
                count=1,
                in_completion=True,
                fault_id=f.fault_id,
            ),
        )
        return None
    return cmd.result(f.status, f.syndrome, "injected fault")
