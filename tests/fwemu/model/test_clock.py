"""VirtualClock: time moves only when told, timers run in time order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwemu.model import VirtualClock


def test_time_moves_only_when_advanced():
    """A VirtualClock moves only when told to."""
    c = VirtualClock(start=10.0)
    assert c.now() == 10.0
    assert c.virtual is True
    c.advance(2.5)
    assert c.now() == 12.5
    c.advance(0)
    assert c.now() == 12.5


def test_time_cannot_go_backwards():
    """Time never goes backwards: a negative advance raises, a past target is a no-op."""
    c = VirtualClock()
    with pytest.raises(ValueError):
        c.advance(-0.1)
    c.advance(5)
    c.advance_to(1.0)  # a moment in the past changes nothing
    assert c.now() == 5


def test_each_timer_runs_at_its_own_time():
    """Due timers run in time order (same time: call order), each at its own time."""
    c = VirtualClock()
    seen: list[tuple[str, float]] = []
    c.call_at(3.0, lambda: seen.append(("b", c.now())))
    c.call_at(1.0, lambda: seen.append(("a", c.now())))
    c.call_at(3.0, lambda: seen.append(("c", c.now())))  # same time: in call order
    c.call_at(9.0, lambda: seen.append(("late", c.now())))
    c.advance(5.0)
    assert seen == [("a", 1.0), ("b", 3.0), ("c", 3.0)]
    assert c.now() == 5.0
    assert c.pending() == 1


def test_a_timer_due_now_runs_on_advance_0():
    """A timer due now runs on advance(0) (how zero-latency SAVEs complete)."""
    c = VirtualClock()
    seen = []
    c.call_at(c.now(), lambda: seen.append(1))
    assert seen == []
    c.advance(0)
    assert seen == [1]


def test_cancelled_timer_never_runs():
    """A cancelled timer never runs."""
    c = VirtualClock()
    seen = []
    t = c.call_at(1.0, lambda: seen.append(1))
    t.cancel()
    assert c.pending() == 0
    c.advance(2.0)
    assert seen == []


def test_timers_scheduled_by_timers_run_in_the_same_advance():
    """Timers scheduled by timers run within the same advance if due."""
    c = VirtualClock()
    seen = []

    def first() -> None:
        seen.append(("first", c.now()))
        c.call_at(c.now() + 1.0, lambda: seen.append(("second", c.now())))

    c.call_at(1.0, first)
    c.advance(3.0)
    assert seen == [("first", 1.0), ("second", 2.0)]


def test_run_until_idle_stops_at_its_horizon():
    """run_until_idle runs pending timers up to its limit only."""
    c = VirtualClock()
    seen = []
    c.call_at(5.0, lambda: seen.append(5))
    c.call_at(50.0, lambda: seen.append(50))
    c.run_until_idle(limit=10.0)
    assert seen == [5]
    assert c.now() == 5.0


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=30), st.floats(0, 120))
def test_timers_fire_in_time_order_up_to_the_target(whens, until):
    """Property: advance(t) runs exactly the timers due by t, in time order."""
    c = VirtualClock()
    seen: list[float] = []
    for w in whens:
        c.call_at(w, lambda w=w: seen.append(w))
    c.advance(until)
    assert seen == sorted(w for w in whens if w <= until)
    assert c.pending() == sum(1 for w in whens if w > until)
