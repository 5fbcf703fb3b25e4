"""vfio_mig_step_loop: the drivers' arc loop (mlx5vf_pci_set_device_state, mtty_set_state)."""

from __future__ import annotations

import errno
import threading
from itertools import product

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driver.vfio import fsm
from driver.vfio.errors import VfioError
from driver.vfio.migration import vfio_mig_step_loop
from driver.vfio.ops import MigrationFile
from driver.vfio.uapi import MIG_STATE, MigState
from tests.support.fsm_reference import TARGETS, expected
from tests.support.vfio_fakes import (
    COMBOS,
    SET_STATE,
    FakeDriver,
    FakeFile,
    FdTable,
    feature,
    open_device,
    run,
)

S = MigState


def _walks() -> list[tuple[str, MigState, MigState]]:
    """(combo, cur, new) of every SET that walks at least one arc and succeeds."""
    out = []
    for combo, cur, new in product(sorted(COMBOS), S, S):
        arcs, einval = expected(cur, new, COMBOS[combo])
        if arcs and not einval:
            out.append((combo, cur, new))
    return out


WALKS = _walks()


@settings(max_examples=300, deadline=None)
@given(
    walk=st.sampled_from(WALKS),
    where=st.integers(0, 7),
    code=st.sampled_from([errno.EIO, errno.ENOMEM, errno.ENODEV, errno.ENOTCONN]),
)
def test_a_failed_arc_leaves_the_device_at_the_last_state_reached(walk, where, code):
    """Drivers stop the loop at the first failing arc; the device stays at the state the
    previous arc reached (uAPI: "device_state may be the original state or any intermediate
    state"), the error is returned, and the core still copies back data_fd = -1."""
    combo, cur, new = walk
    flags = COMBOS[combo]
    arcs, _ = expected(cur, new, flags)
    k = where % len(arcs)

    async def go() -> None:
        driver = FakeDriver(flags)
        device = await open_device(driver)
        driver.state = cur
        driver.fail_arcs[arcs[k]] = code
        data = bytearray(MIG_STATE.pack(new, 99))
        with pytest.raises(VfioError) as info:
            await feature(device, SET_STATE, data)
        assert info.value.errno == code
        assert info.value.last_state == arcs[k][0]
        assert driver.state == arcs[k][0]
        assert driver.arcs == arcs[: k + 1]
        assert MIG_STATE.unpack(data) == (new, -1)
        assert driver.files == []

    run(go())


async def test_a_file_from_a_non_final_arc_is_einval_and_dropped():
    """mlx5/mtty: WARN_ON(res && new_state != mig_state) -> fput(res), -EINVAL; the device has
    already reached that arc's state."""
    driver = FakeDriver()
    device = await open_device(driver)
    driver.file_arcs.add((S.RUNNING, S.RUNNING_P2P))
    data = bytearray(MIG_STATE.pack(S.STOP, 7))
    with pytest.raises(VfioError) as info:
        await feature(device, SET_STATE, data)
    assert info.value.errno == errno.EINVAL
    assert info.value.last_state == S.RUNNING_P2P == driver.state
    assert driver.arcs == [(S.RUNNING, S.RUNNING_P2P)]
    assert [f.released for f in driver.files] == [True]
    assert MIG_STATE.unpack(data) == (S.STOP, -1)


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("cur", [s for s in S if s != S.ERROR])
async def test_error_as_target_is_einval(combo, cur):
    """ERROR's requirement mask is ~0, so it is never a valid target: -EINVAL, no arc."""
    driver = FakeDriver(COMBOS[combo])
    device = await open_device(driver)
    driver.state = cur
    with pytest.raises(VfioError) as info:
        await feature(device, SET_STATE, MIG_STATE.pack(S.ERROR, 0))
    assert info.value.errno == errno.EINVAL
    assert driver.arcs == []


async def test_error_to_error_is_a_no_op_as_in_the_driver_loops():
    """The loops test `while (new_state != mig_state)` before asking for a next state, so SET
    ERROR on a device already in ERROR succeeds without a call (kernel behaviour)."""
    driver = FakeDriver()
    device = await open_device(driver)
    driver.state = S.ERROR
    out = await feature(device, SET_STATE, MIG_STATE.pack(S.ERROR, 0))
    assert MIG_STATE.unpack(out) == (S.ERROR, -1)
    assert driver.arcs == []
    with pytest.raises(VfioError) as info:
        await feature(device, SET_STATE, MIG_STATE.pack(S.RUNNING, 0))
    assert info.value.errno == errno.EINVAL  # ERROR is left only by a reset
    await device.reset()
    assert driver.state == S.RUNNING


@pytest.mark.timeout(5)
@pytest.mark.parametrize("target", [S.PRE_COPY, S.PRE_COPY_P2P])
def test_stop_copy_to_pre_copy_is_einval_and_does_not_hang(target):
    """vfio_mig_get_next_state stops at ERROR (2026 fix): STOP_COPY -> PRE_COPY(_P2P) used to
    spin forever in the skip-unsupported loop; it is -EINVAL."""
    result: list[object] = []

    def probe() -> None:
        try:
            fsm.next_state(S.STOP_COPY, target, COMBOS["SC+P2P+PRE"])
        except VfioError as err:
            result.append(err.errno)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(2)
    assert not thread.is_alive(), "next_state hangs"
    assert result == [errno.EINVAL]


async def test_stop_copy_to_pre_copy_through_the_device():
    """The same transition through MIG_DEVICE_STATE SET: -EINVAL, device still in STOP_COPY."""
    driver = FakeDriver()
    device = await open_device(driver)
    driver.state = S.STOP_COPY
    with pytest.raises(VfioError) as info:
        await feature(device, SET_STATE, MIG_STATE.pack(S.PRE_COPY, 0))
    assert info.value.errno == errno.EINVAL
    assert driver.state == S.STOP_COPY and driver.arcs == []


@pytest.mark.parametrize("new", [8, 9, 0x7FFFFFFF, 0xFFFFFFFF])
async def test_out_of_range_target_is_einval_without_arcs(new):
    """new_fsm >= VFIO_DEVICE_NUM_STATES: -EINVAL; the struct is copied back with data_fd -1."""
    driver = FakeDriver()
    device = await open_device(driver)
    data = bytearray(MIG_STATE.pack(new, 5))
    with pytest.raises(VfioError) as info:
        await feature(device, SET_STATE, data)
    assert info.value.errno == errno.EINVAL
    assert driver.arcs == [] and driver.state == S.RUNNING
    assert MIG_STATE.unpack(data) == (new, -1)


@pytest.mark.parametrize("cur", list(S))
async def test_same_state_calls_nothing(cur):
    """cur == new: the loop body never runs (not even vfio_mig_get_next_state)."""
    calls: list[MigState] = []

    async def step(nxt: MigState) -> MigrationFile | None:
        calls.append(nxt)
        return None

    assert await vfio_mig_step_loop(cur, cur, 0, step) == (cur, None)
    assert calls == []


class HookLog:
    """ArcHooks that record their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, MigState, MigState]] = []

    def arc_starting(self, cur: MigState, nxt: MigState) -> None:
        self.calls.append(("starting", cur, nxt))

    def arc_ended(self, cur: MigState, nxt: MigState, file: MigrationFile | None) -> None:
        self.calls.append(("ended", cur, nxt))

    def arc_done(self, cur: MigState, nxt: MigState, file: MigrationFile | None) -> None:
        self.calls.append(("done", cur, nxt))


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("cur", list(S))
@pytest.mark.parametrize("new", TARGETS)
async def test_loop_runs_the_hooks_around_every_arc_and_returns_the_final_file(combo, cur, new):
    """Each arc: arc_starting, the step, arc_ended, arc_done (where mlx5vf records
    mig_state = next_state); the file of the final arc is returned; an error carries
    last_state."""
    flags = COMBOS[combo]
    arcs, einval = expected(cur, new, flags)
    hooks = HookLog()
    file = FakeFile(None, (cur, S.ERROR))

    async def step(nxt: MigState) -> MigrationFile | None:
        return file if arcs and nxt == arcs[-1][1] else None

    if einval:
        with pytest.raises(VfioError) as info:
            await vfio_mig_step_loop(cur, new, flags, step, hooks)
        assert info.value.errno == errno.EINVAL
        assert info.value.last_state == (arcs[-1][1] if arcs else cur)
    else:
        state, got = await vfio_mig_step_loop(cur, new, flags, step, hooks)
        assert state == new
        assert got is (file if arcs else None)
    assert hooks.calls == [(h, a, b) for a, b in arcs for h in ("starting", "ended", "done")]


async def test_install_fd_failure_drops_the_file_and_copies_nothing():
    """vfio_ioct_mig_return_fd: get_unused_fd_flags fails -> fput(filp), error returned, the
    user's struct untouched (the device did reach the new state)."""
    driver = FakeDriver()
    device = await open_device(driver)
    driver.state = S.STOP
    data = bytearray(MIG_STATE.pack(S.STOP_COPY, 42))
    with pytest.raises(VfioError) as info:
        await feature(device, SET_STATE, data, fds=FdTable(error=errno.EMFILE))
    assert info.value.errno == errno.EMFILE
    assert [f.released for f in driver.files] == [True]
    assert MIG_STATE.unpack(data) == (S.STOP_COPY, 42)
    assert driver.state == S.STOP_COPY
