"""Time as a parameter of the device model.

The model asks a Clock for the time and schedules SAVE completions on it.  The
service uses the event loop's clock; tests use VirtualClock and move time by
hand, so nothing sleeps and every run is repeatable.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What the model needs from time."""

    virtual: bool

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...


class _VirtualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """A clock that moves only when told to; timers run in time order."""

    virtual = True

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, _VirtualTimer]] = []

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> _VirtualTimer:
        timer = _VirtualTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def pending(self) -> int:
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> None:
        """Move time forward, running each due timer at its own time."""
        if not 0 <= seconds < float("inf"):
            raise ValueError("the clock moves forward by a finite number of seconds")
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        while self._timers and self._timers[0][0] <= when:
            due, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, due)
            timer.callback()
        self._now = max(self._now, when)

    def run_until_idle(self, limit: float = 3600.0) -> None:
        """Run every pending timer (and those they schedule) up to `limit` seconds ahead."""
        horizon = self._now + limit
        while self._timers and self._timers[0][0] <= horizon:
            self.advance_to(self._timers[0][0])


class LoopClock:
    """The running asyncio loop's monotonic clock (the service's clock)."""

    virtual = False

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()

    def call_at(self, when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self._loop.call_at(when, callback)


async def sleep(clock: Clock, seconds: float) -> None:
    """Wait `seconds` of `clock` time (on a VirtualClock: until it is advanced)."""
    if seconds <= 0:
        return
    done = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    handle = clock.call_at(clock.now() + seconds, wake)
    try:
        await done
    finally:
        handle.cancel()
