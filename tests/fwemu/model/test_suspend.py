"""SUSPEND_VHCA / RESUME_VHCA: op_mod numbering and the three legal states."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwemu.link.ifc import CmdStatus, KiB, ResumeOpMod, SuspendOpMod, Syndrome

SUSPEND_INITIATOR = SuspendOpMod.SUSPEND_INITIATOR
SUSPEND_RESPONDER = SuspendOpMod.SUSPEND_RESPONDER
RESUME_RESPONDER = ResumeOpMod.RESUME_RESPONDER
RESUME_INITIATOR = ResumeOpMod.RESUME_INITIATOR

RUNNING, INITIATOR_SUSPENDED, FULLY_SUSPENDED = 0, 1, 2
# (initiator_suspended, responder_suspended) of each legal state.
FLAGS = {
    RUNNING: (False, False),
    INITIATOR_SUSPENDED: (True, False),
    FULLY_SUSPENDED: (True, True),
}


def expected(state: int, cmd: str, op_mod: int) -> tuple[int, int]:
    """The README's rule: (status, next state) of one command in one state.

    RUNNING <-> initiator suspended <-> fully suspended.  SUSPEND RESPONDER needs
    the initiator suspended, RESUME INITIATOR needs the responder running;
    anything else, including a repeat, is BAD_RES_STATE; an unknown op_mod is
    BAD_PARAM."""
    if op_mod not in (0, 1):
        return CmdStatus.BAD_PARAM_ERR, state
    if cmd == "suspend":
        if op_mod == SUSPEND_INITIATOR and state == RUNNING:
            return CmdStatus.OK, INITIATOR_SUSPENDED
        if op_mod == SUSPEND_RESPONDER and state == INITIATOR_SUSPENDED:
            return CmdStatus.OK, FULLY_SUSPENDED
    else:
        if op_mod == RESUME_RESPONDER and state == FULLY_SUSPENDED:
            return CmdStatus.OK, INITIATOR_SUSPENDED
        if op_mod == RESUME_INITIATOR and state == INITIATOR_SUSPENDED:
            return CmdStatus.OK, RUNNING
    return CmdStatus.BAD_RES_STATE_ERR, state


def test_op_mod_numbering_matches_mlx5_ifc():
    """mlx5_ifc.h: SUSPEND INITIATOR 0, RESPONDER 1; RESUME RESPONDER 0,
    INITIATOR 1 (the numbering is swapped between the two commands)."""
    assert (int(SUSPEND_INITIATOR), int(SUSPEND_RESPONDER)) == (0, 1)
    assert (int(RESUME_RESPONDER), int(RESUME_INITIATOR)) == (0, 1)


async def test_full_round_trip_in_mlx5vf_order(h):
    """RUNNING -> RUNNING_P2P (SUSPEND 0) -> STOP (SUSPEND 1) -> RUNNING_P2P
    (RESUME 0) -> RUNNING (RESUME 1), as mlx5vf_pci_step_device_state_locked."""
    vhca = await h.vf(size=64 * KiB)
    steps = [
        ("suspend", SUSPEND_INITIATOR, (True, False)),
        ("suspend", SUSPEND_RESPONDER, (True, True)),
        ("resume", RESUME_RESPONDER, (True, False)),
        ("resume", RESUME_INITIATOR, (False, False)),
    ]
    for cmd, op_mod, flags in steps:
        fn = h.suspend if cmd == "suspend" else h.resume
        res = await fn(vhca, op_mod)
        assert res.ok, (cmd, op_mod, res)
        info = await h.info(vhca)
        assert (info.initiator_suspended, info.responder_suspended) == flags


async def test_responder_cannot_be_suspended_before_the_initiator(h):
    """SUSPEND RESPONDER needs the initiator suspended: BAD_RES_STATE / INITIATOR_RUNNING."""
    vhca = await h.vf(size=64 * KiB)
    res = await h.suspend(vhca, SUSPEND_RESPONDER)
    assert (res.status, res.syndrome) == (CmdStatus.BAD_RES_STATE_ERR, Syndrome.INITIATOR_RUNNING)
    info = await h.info(vhca)
    assert (info.initiator_suspended, info.responder_suspended) == (False, False)


async def test_initiator_cannot_resume_while_the_responder_is_suspended(h):
    """RESUME INITIATOR needs the responder running: BAD_RES_STATE / RESPONDER_SUSPENDED."""
    vhca = await h.vf(size=64 * KiB)
    await h.suspend_fully(vhca)
    res = await h.resume(vhca, RESUME_INITIATOR)
    assert (res.status, res.syndrome) == (
        CmdStatus.BAD_RES_STATE_ERR,
        Syndrome.RESPONDER_SUSPENDED,
    )
    info = await h.info(vhca)
    assert (info.initiator_suspended, info.responder_suspended) == (True, True)


@pytest.mark.parametrize("op_mod", [SUSPEND_INITIATOR, SUSPEND_RESPONDER])
async def test_repeated_suspend_is_bad_res_state(h, op_mod):
    """A repeated SUSPEND is BAD_RES_STATE (0x9), not a silent success."""
    vhca = await h.vf(size=64 * KiB)
    if op_mod == SUSPEND_RESPONDER:
        await h.suspend_fully(vhca)
    else:
        assert (await h.suspend(vhca, SUSPEND_INITIATOR)).ok
    res = await h.suspend(vhca, op_mod)
    assert res.status == CmdStatus.BAD_RES_STATE_ERR == 0x9
    assert res.syndrome == Syndrome.ALREADY_SUSPENDED


@pytest.mark.parametrize("op_mod", [RESUME_RESPONDER, RESUME_INITIATOR])
async def test_resume_of_a_running_vf_is_bad_res_state(h, op_mod):
    """Resuming what runs is BAD_RES_STATE."""
    vhca = await h.vf(size=64 * KiB)
    res = await h.resume(vhca, op_mod)
    assert res.status == CmdStatus.BAD_RES_STATE_ERR, res


@pytest.mark.parametrize("cmd", ["suspend", "resume"])
@pytest.mark.parametrize("op_mod", [2, 3, 0xFFFF])
async def test_unknown_op_mod_is_bad_param_and_changes_nothing(h, cmd, op_mod):
    """SUSPEND/RESUME op_mod other than 0/1 is BAD_PARAM (0x3) / BAD_OP_MOD and changes nothing."""
    vhca = await h.vf(size=64 * KiB)
    assert (await h.suspend(vhca, SUSPEND_INITIATOR)).ok
    fn = h.suspend if cmd == "suspend" else h.resume
    res = await fn(vhca, op_mod)
    assert (res.status, res.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.BAD_OP_MOD)
    assert res.status == 0x3
    info = await h.info(vhca)
    assert (info.initiator_suspended, info.responder_suspended) == (True, False)


async def test_suspend_and_resume_of_an_unknown_vhca_is_bad_param(h):
    """SUSPEND/RESUME of an unknown vhca_id is BAD_PARAM / UNKNOWN_VHCA."""
    await h.vf(size=64 * KiB)
    for res in (await h.suspend(7, SUSPEND_INITIATOR), await h.resume(7, RESUME_RESPONDER)):
        assert (res.status, res.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.UNKNOWN_VHCA)


commands = st.lists(
    st.tuples(st.sampled_from(["suspend", "resume"]), st.sampled_from([0, 1, 0, 1, 2])),
    max_size=25,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cmds=commands)
async def test_any_command_sequence_keeps_one_of_the_three_legal_states(h, cmds):
    """Property: whatever SUSPEND/RESUME sequence the driver sends, the VF is
    always RUNNING, initiator suspended or fully suspended, and each command
    succeeds exactly when the README's rule says (BAD_RES_STATE otherwise,
    BAD_PARAM for an unknown op_mod)."""
    vhca = await h.vf(size=4 * KiB, dirty_bytes_per_s=0)  # a fresh VF per example
    state = RUNNING
    for cmd, op_mod in cmds:
        fn = h.suspend if cmd == "suspend" else h.resume
        res = await fn(vhca, op_mod)
        want_status, state = expected(state, cmd, op_mod)
        assert res.status == want_status, (cmd, op_mod, res)
        info = await h.info(vhca)
        assert (info.initiator_suspended, info.responder_suspended) == FLAGS[state]
    await h.link.remove_vf(vhca)
