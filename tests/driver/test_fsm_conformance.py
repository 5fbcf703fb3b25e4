"""MIG_DEVICE_STATE SET against the FSM of the reference (fsm_reference.py), for
every capability combination and every (current, target) pair."""

from __future__ import annotations

import errno
from itertools import product

import pytest
from fsm_reference import (
    BLOCKED,
    TARGETS,
    expected,
    parse_arcs,
    saving_rule_ok,
    shortest,
    supported,
)
from vfio_fakes import (
    COMBOS,
    GET_STATE,
    SET_STATE,
    FakeDriver,
    FdTable,
    feature,
    open_device,
)

from driver.vfio import fsm
from driver.vfio.errors import VfioError
from driver.vfio.uapi import MIG_STATE, MigState

S = MigState


async def set_state(cur: MigState, new: int, flags: int) -> tuple[FakeDriver, int | None, bytes]:
    driver = FakeDriver(flags)
    device = await open_device(driver)
    driver.state = cur
    data = bytearray(MIG_STATE.pack(new, 1234))
    fds = FdTable()
    try:
        await feature(device, SET_STATE, data, fds=fds)
        code = None
    except VfioError as err:
        code = err.errno
    return driver, code, bytes(data)


async def mismatches(flags: int) -> list[str]:
    """Every (cur, target) whose outcome differs from the reference."""
    bad = []
    allowed = parse_arcs(flags)
    for cur, new in product(S, TARGETS):
        want_arcs, want_einval = expected(cur, new, flags)
        driver, code, data = await set_state(cur, new, flags)
        if (
            driver.arcs != want_arcs
            or (code == errno.EINVAL) != want_einval
            or (code not in (None, errno.EINVAL))
        ):
            bad.append(f"{cur.name}->{new}: got {driver.arcs} {code}, want {want_arcs}")
            continue
        state, data_fd = MIG_STATE.unpack(data)
        last_is_file = bool(want_arcs) and want_arcs[-1] in driver.file_arcs and not want_einval
        if state != new or (data_fd != -1) != last_is_file:
            bad.append(f"{cur.name}->{new}: copied back {state}, {data_fd}")
        for arc in driver.arcs:
            if arc not in allowed:
                bad.append(f"{cur.name}->{new}: arc {arc} is not a §1.2 arc")
        if want_einval or cur == new:
            continue
        if not saving_rule_ok([cur] + [b for _, b in want_arcs]):
            bad.append(f"{cur.name}->{new}: passes through the saving group")
        if len(want_arcs) != shortest(cur, S(new), allowed):
            bad.append(f"{cur.name}->{new}: not a shortest path")
    return bad


@pytest.mark.parametrize("combo", COMBOS)
async def test_set_state_follows_the_reference_fsm(combo):
    """vfio_mig_get_next_state + the driver loop: for every (current, target), either EINVAL
    or exactly the reference's arcs, each a §1.2 arc of the combination, shortest, saving-group
    states only at the ends; data_fd only when the last arc opens a data session."""
    assert await mismatches(COMBOS[combo]) == []


async def test_the_conformance_check_catches_a_wrong_table(monkeypatch):
    """Guard on the guard: one wrong cell of the kernel table (RUNNING->STOP straight to STOP
    with P2P) must be reported."""
    monkeypatch.setitem(fsm.FSM_TABLE[S.RUNNING], S.STOP, S.STOP)
    assert await mismatches(COMBOS["SC+P2P"]) != []


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
