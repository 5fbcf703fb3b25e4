"""The function's run state: SUSPEND_VHCA, RESUME_VHCA and the PCI function
level reset."""

from __future__ import annotations

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


def suspend_vhca(fw: FirmwareState, vf: Vf, cmd: SuspendVhcaIn) -> CmdResult:
    op_mod = cmd.op_mod
    if op_mod not in (SuspendOpMod.SUSPEND_INITIATOR, SuspendOpMod.SUSPEND_RESPONDER):
        return CmdResult(
            CmdStatus.BAD_PARAM_ERR,
            Syndrome.BAD_OP_MOD,
            f"SUSPEND_VHCA op_mod {op_mod} (0 INITIATOR, 1 RESPONDER)",
        )
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
    if op_mod not in (ResumeOpMod.RESUME_RESPONDER, ResumeOpMod.RESUME_INITIATOR):
        return CmdResult(
            CmdStatus.BAD_PARAM_ERR,
            Syndrome.BAD_OP_MOD,
            f"RESUME_VHCA op_mod {op_mod} (0 RESPONDER, 1 INITIATOR)",
        )
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
