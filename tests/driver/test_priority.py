"""driver/priority.py: a principal's precopy requests wait for its own
switchovers, and only for them, at most max_wait each, and a stopped device
counts for at most `span` seconds."""

from __future__ import annotations

import asyncio
import math

import pytest

from driver.priority import MAX_PRIORITY_WAIT_S, SwitchoverPriority

A, B = "tenant-a", "tenant-b"


async def _until(cond: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


async def test_a_precopy_request_waits_until_its_principals_switchover_ends() -> None:
    prio = SwitchoverPriority(max_wait=5.0)
    stopped, running = object(), object()
    prio.stopped(A, stopped)
    turn = asyncio.ensure_future(prio.precopy_turn(A))
    await _until(lambda: prio.waiting == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not turn.done()
    prio.resumed(running)  # another device: still waiting
    await asyncio.sleep(0.01)
    assert not turn.done()
    prio.resumed(stopped)
    waited = await asyncio.wait_for(turn, 5.0)
    assert 0 < waited < 5.0
    assert (prio.waiting, prio.deferred) == (0, 1)
    assert prio.deferred_s == pytest.approx(waited)


async def test_another_principals_switchover_delays_nothing() -> None:
    prio = SwitchoverPriority(max_wait=5.0)
    prio.stopped(B, object())
    assert await asyncio.wait_for(prio.precopy_turn(A), 1.0) == 0.0
    assert prio.deferred == 0 and prio.switching(B) == 1 and prio.switching(A) == 0


async def test_off_and_idle_cost_nothing() -> None:
    off = SwitchoverPriority(max_wait=0)
    off.stopped(A, object())
    assert await off.precopy_turn(A) == 0.0
    idle = SwitchoverPriority()
    assert await idle.precopy_turn(A) == 0.0
    assert off.deferred == idle.deferred == 0


async def test_a_request_waits_at_most_max_wait() -> None:
    """A device left stopped (a failed or hostile migration) delays each of
    its principal's precopy requests by max_wait, not for ever."""
    prio = SwitchoverPriority(max_wait=0.05)
    prio.stopped(A, object())
    waited = await asyncio.wait_for(prio.precopy_turn(A), 5.0)
    assert 0.05 <= waited < 5.0
    assert prio.switching(A) == 1 and prio.waiting == 0


async def test_a_device_counts_for_span_seconds_from_when_it_first_stopped() -> None:
    now = [100.0]
    prio = SwitchoverPriority(max_wait=5.0, span=2.0, clock=lambda: now[0])
    dev = object()
    prio.stopped(A, dev)  # PRE_COPY_P2P
    now[0] = 101.5
    prio.stopped(A, dev)  # then STOP_COPY: still the first time
    assert prio.switching(A) == 1
    now[0] = 102.0
    assert prio.switching(A) == 0
    assert await asyncio.wait_for(prio.precopy_turn(A), 1.0) == 0.0
    assert prio.deferred == 0


async def test_a_cancelled_wait_is_counted_and_leaves_nothing_waiting() -> None:
    prio = SwitchoverPriority(max_wait=5.0)
    prio.stopped(A, object())
    turn = asyncio.ensure_future(prio.precopy_turn(A))
    await _until(lambda: prio.waiting == 1)
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn
    assert (prio.waiting, prio.deferred) == (0, 1)


@pytest.mark.parametrize(
    ("max_wait", "span"),
    [
        (-0.1, 2.0),
        (math.nan, 2.0),
        (math.inf, 2.0),
        (MAX_PRIORITY_WAIT_S + 0.1, 2.0),
        (0.5, 0.0),
        (0.5, -1.0),
        (0.5, math.nan),
        (0.5, math.inf),
    ],
)
def test_absurd_bounds_are_refused(max_wait: float, span: float) -> None:
    with pytest.raises(ValueError, match="max_wait"):
        SwitchoverPriority(max_wait, span)
