"""The function's run state: SUSPEND_VHCA, RESUME_VHCA and the PCI function
level reset."""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING

from ..link.ifc import (
    CmdResult,
    CmdStatus,
    FunctionLevelResetIn,
    ResumeOpMod,
    ResumeVhcaIn,
    SuspendOpMod,
    SuspendVhcaIn,
    Syndrome,
    opcode_name,
)
from .save import abort_save

if TYPE_CHECKING:
    from .state import FirmwareState
    from .vf import Vf

log = logging.getLogger("fwemu.firmware")


def _changed(vf: Vf, cmd: SuspendVhcaIn | ResumeVhcaIn) -> CmdResult:
    log.info(
        "function %s",
        "running" if vf.running else "suspended",
        extra={
            "vhca_id": vf.vhca_id,
            "opcode": opcode_name(cmd.opcode),
            "initiator_suspended": vf.initiator_suspended,
            "responder_suspended": vf.responder_suspended,
        },
    )
    return CmdResult()


def _bad_op_mod(cmd: SuspendVhcaIn | ResumeVhcaIn, op_mods: type[enum.IntEnum]) -> CmdResult:
    """BAD_PARAM / BAD_OP_MOD, naming the op_mods the command takes
    ("SUSPEND_VHCA op_mod 2 (0 INITIATOR, 1 RESPONDER)")."""
    known = ", ".join(f"{m.value} {m.name.split('_', 1)[1]}" for m in op_mods)
    return CmdResult(
        CmdStatus.BAD_PARAM_ERR,
        Syndrome.BAD_OP_MOD,
        f"{opcode_name(cmd.opcode)} op_mod {cmd.op_mod} ({known})",
    )


def suspend_vhca(fw: FirmwareState, vf: Vf, cmd: SuspendVhcaIn) -> CmdResult:
    op_mod = cmd.op_mod
    if op_mod not in set(SuspendOpMod):
        return _bad_op_mod(cmd, SuspendOpMod)
    if vf.save_in_flight is not None:
        return CmdResult(
            CmdStatus.RES_BUSY, Syndrome.SAVE_IN_FLIGHT, "a SAVE_VHCA_STATE is in flight"
        )
    now = fw.clock.now()
    if op_mod == SuspendOpMod.SUSPEND_INITIATOR:
        if vf.initiator_suspended:
            return CmdResult(
                CmdStatus.BAD_RES_STATE_ERR,
                Syndrome.ALREADY_SUSPENDED,
                "initiator already suspended",
            )
        vf.set_suspended(initiator=True, responder=vf.responder_suspended, now=now)
    else:
        if not vf.initiator_suspended:
            return CmdResult(
                CmdStatus.BAD_RES_STATE_ERR,
                Syndrome.INITIATOR_RUNNING,
                "suspend the initiator (op_mod 0) before the responder",
            )
        if vf.responder_suspended:
            return CmdResult(
                CmdStatus.BAD_RES_STATE_ERR,
                Syndrome.ALREADY_SUSPENDED,
                "responder already suspended",
            )
        vf.set_suspended(initiator=True, responder=True, now=now)
        vf.loads_since_suspend = 0
    return _changed(vf, cmd)


def resume_vhca(fw: FirmwareState, vf: Vf, cmd: ResumeVhcaIn) -> CmdResult:
    op_mod = cmd.op_mod
    if op_mod not in set(ResumeOpMod):
        return _bad_op_mod(cmd, ResumeOpMod)
    now = fw.clock.now()
    if op_mod == ResumeOpMod.RESUME_RESPONDER:
        if not vf.responder_suspended:
            return CmdResult(
                CmdStatus.BAD_RES_STATE_ERR, Syndrome.NOT_SUSPENDED, "responder is not suspended"
            )
        vf.set_suspended(initiator=vf.initiator_suspended, responder=False, now=now)
        vf.load_chain = None  # what was loaded is now the running state
    else:
        if vf.responder_suspended:
            return CmdResult(
                CmdStatus.BAD_RES_STATE_ERR,
                Syndrome.RESPONDER_SUSPENDED,
                "resume the responder (op_mod 0) before the initiator",
            )
        if not vf.initiator_suspended:
            return CmdResult(
                CmdStatus.BAD_RES_STATE_ERR, Syndrome.NOT_SUSPENDED, "initiator is not suspended"
            )
        vf.set_suspended(initiator=False, responder=False, now=now)
    vf.advance(now)  # fire reconfigurations that waited for the VF
    return _changed(vf, cmd)


def function_level_reset(fw: FirmwareState, vf: Vf, cmd: FunctionLevelResetIn) -> CmdResult:
    abort_save(fw, vf, "function level reset")
    vf.reset_function(fw.clock.now())
    return CmdResult()
