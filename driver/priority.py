"""Switchover priority: while a principal's devices switch over, that
principal's precopy requests wait their turn (at most `max_wait` each).

A switchover is the downtime: its VM is stopped until the destination runs.
In the kernel each QEMU's ioctls run in its own thread, on whichever core is
free; here one event loop serves every device of the driver, first come first
served, so a stopped VM's state changes and reads queue behind the precopy
work of every migration still running (benchmarks/concurrency.md: with 64 at
once, the slowest downtime was ~2x the limit).  So, as QEMU itself puts the
downtime first (no rate limit once the VM is stopped), the driver does: a
device of principal P counts as switching over while it is in PRE_COPY_P2P
or STOP_COPY (the source's side of the downtime), and while one does, P's
requests that only move a running VM's precopy along wait:
VFIO_MIG_GET_PRECOPY_INFO, VFIO_DEVICE_FEATURE_MIG_DATA_SIZE and reads of
the saving data fd (blocking ones: O_NONBLOCK asks not to wait), each on a
device in PRE_COPY.  Answers are not changed,
only delayed; nothing else waits (state changes, writes, other principals).

Bounds, so that no client can stall another through this:
- only the same principal's switchovers delay its precopy: a tenant cannot
  slow another tenant's migrations down, however many it stops;
- a request waits at most `max_wait` seconds, then goes on;
- a device counts for at most `span` seconds after it stopped: a client that
  leaves a device stopped (a failed migration, a hostile one) delays its own
  other precopies for that long, not for ever.

`max_wait` 0 turns it off (`vfio-driver serve --switchover-priority 0`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from grpcsvc.units import seconds_between

DEFAULT_MAX_WAIT_S = 0.5  # a precopy request waits at most this long
DEFAULT_SPAN_S = 2.0  # a stopped device counts for at most this long
MAX_PRIORITY_WAIT_S = 10.0  # the most --switchover-priority takes


# argparse type of --switchover-priority (the driver's, the benchmark's).
priority_wait_arg = seconds_between(0.0, MAX_PRIORITY_WAIT_S, low_too=True)


@dataclass
class _Principal:
    since: dict[object, float] = field(default_factory=dict)  # device -> when it stopped
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set: none switching


class SwitchoverPriority:
    """Which devices switch over, by principal, and the wait of a precopy
    request behind them."""

    def __init__(
        self,
        max_wait: float = DEFAULT_MAX_WAIT_S,
        span: float = DEFAULT_SPAN_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not 0 <= max_wait <= MAX_PRIORITY_WAIT_S or not 0 < span < float("inf"):
            raise ValueError(f"max_wait {max_wait} must be >= 0 and span {span} > 0")
        self.max_wait = max_wait
        self.span = span
        self._clock = clock
        self._by_principal: dict[str, _Principal] = {}
        self.waiting = 0  # precopy requests waiting now
        self.deferred = 0  # precopy requests that waited
        self.deferred_s = 0.0  # the seconds they waited, in all

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def stopped(self, principal: str, device: object) -> None:
        """`device` of `principal` entered PRE_COPY_P2P or STOP_COPY (again:
        it keeps the time it first stopped)."""
        p = self._by_principal.get(principal)
        if p is None:
            p = self._by_principal[principal] = _Principal()
        p.since.setdefault(device, self._now())
        p.idle.clear()

    def resumed(self, device: object) -> None:
        """`device` left PRE_COPY_P2P / STOP_COPY (or was closed or reset)."""
        for principal, p in list(self._by_principal.items()):
            if p.since.pop(device, None) is not None and not p.since:
                p.idle.set()
                del self._by_principal[principal]

    def switching(self, principal: str) -> int:
        """How many of `principal`'s devices count as switching over now."""
        p = self._by_principal.get(principal)
        if p is None:
            return 0
        now = self._now()
        return sum(1 for t in p.since.values() if now - t < self.span)

    async def precopy_turn(self, principal: str) -> float:
        """Wait while `principal` has a device switching over, at most
        `max_wait`; the seconds waited."""
        if self.max_wait <= 0 or not self.switching(principal):
            return 0.0
        start = self._now()
        deadline = start + self.max_wait
        self.waiting += 1
        try:
            await self._wait(principal, deadline)
        finally:
            self.waiting -= 1
            waited = self._now() - start
            self.deferred += 1
            self.deferred_s += waited
        return waited

    async def _wait(self, principal: str, deadline: float) -> None:
        while True:
            p = self._by_principal.get(principal)
            now = self._now()
            if p is None or now >= deadline:
                break
            live = [t + self.span for t in p.since.values() if t + self.span > now]
            if not live:
                break
            # Until none switches, the oldest stops counting, or the wait ends.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.idle.wait(), min(deadline, min(live)) - now)
