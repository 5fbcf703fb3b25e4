"""MIG_DEVICE_STATE SET against the FSM of the reference (tests/support/fsm_reference.py), for
every capability combination and every (current, target) pair."""

from __future__ import annotations

from itertools import product

import pytest

from driver.vfio import fsm
from driver.vfio.errors import VfioError
from driver.vfio.uapi import MIG_STATE, MigState
from tests.support.fsm_reference import (
    BLOCKED,
    SetOutcome,
    SetState,
    expected,
    mismatches,
    parse_arcs,
    shortest,
    supported,
)
from tests.support.vfio_fakes import (
    COMBOS,
    GET_STATE,
    SET_STATE,
    FakeDriver,
    FdTable,
    feature,
    open_device,
)

S = MigState


def fake_set_state(flags: int) -> SetState:
    """SET on a fresh FakeDriver (the core's arc loop over a step that records arcs)."""

    async def set_state(cur: MigState, new: int) -> SetOutcome:
        driver = FakeDriver(flags)
        device = await open_device(driver)
        driver.state = cur
        data = bytearray(MIG_STATE.pack(new, 1234))
        try:
            await feature(device, SET_STATE, data, fds=FdTable())
            code = None
        except VfioError as err:
            code = err.errno
        return SetOutcome(driver.arcs, code, MIG_STATE.unpack(data))

    return set_state


@pytest.mark.parametrize("combo", COMBOS)
async def test_set_state_follows_the_reference_fsm(combo):
    """vfio_mig_get_next_state + the driver loop: for every (current, target), either EINVAL
    or exactly the reference's arcs, each a §1.2 arc of the combination, shortest, saving-group
    states only at the ends; data_fd only when the last arc opens a data session."""
    assert await mismatches(COMBOS[combo], fake_set_state(COMBOS[combo])) == []


async def test_the_conformance_check_catches_a_wrong_table(monkeypatch):
    """Guard on the guard: one wrong cell of the kernel table (RUNNING->STOP straight to STOP
    with P2P) must be reported."""
    monkeypatch.setitem(fsm.FSM_TABLE[S.RUNNING], S.STOP, S.STOP)
    flags = COMBOS["SC+P2P"]
    assert await mismatches(flags, fake_set_state(flags)) != []


@pytest.mark.parametrize("combo", COMBOS)
def test_reference_einval_cases_are_exactly_the_unreachable_ones(combo):
    """For supported (cur, target) pairs the table fails only where the uAPI blocks the
    transition (STOP_COPY -> PRE_COPY*); everything else is reachable."""
    flags = COMBOS[combo]
    for cur, new in product(S, S):
        if cur == new or not supported(cur, flags) or not supported(new, flags):
            continue
        _, einval = expected(cur, new, flags)
        assert einval == ((cur, new) in BLOCKED), (cur, new)
        if not einval:
            assert shortest(cur, new, parse_arcs(flags)) is not None


async def test_get_reports_the_state_with_no_fd():
    """MIG_DEVICE_STATE GET: device_state = migration_get_state, data_fd = -1."""
    driver = FakeDriver()
    device = await open_device(driver)
    driver.state = S.PRE_COPY_P2P
    out = await feature(device, GET_STATE, MIG_STATE.pack(0, 55))
    assert MIG_STATE.unpack(out) == (S.PRE_COPY_P2P, -1)
