"""Automatic reconfigurations of a VF: a Poisson process on the firmware clock
(VfConfig.reconfig_rate_per_s), as a guest that creates and destroys objects
now and then.

Arrival times are drawn from a generator seeded from the VF's seed, so the same
seed and the same clock steps give the same reconfigurations.  Only the VF's
running time counts: arrivals that fall while it is suspended are void (the
process is memoryless, so starting it again when the VF is next looked at is
the same process).  Like the workload's page writes, one look at the VF fires
at most MAX_PER_LOOK of the arrivals due; the rest of that interval's arrivals
are skipped and the process starts again at the look, so a look costs bounded
CPU whatever the rate and however far the clock moved.
"""

from __future__ import annotations

import math
import random

# Automatic reconfigurations one look at a VF performs at most.
MAX_PER_LOOK = 64


class ReconfigRate:
    """When a VF's next automatic reconfiguration is due (math.inf: none)."""

    __slots__ = ("_rng", "next_at", "rate")

    def __init__(self, seed: int, rate: float, now: float) -> None:
        self._rng = random.Random(seed ^ 0x9015_5011)
        self.rate = rate
        self.next_at = self._after(now)

    def _after(self, t: float) -> float:
        return t + self._rng.expovariate(self.rate) if self.rate > 0 else math.inf

    def due(self, now: float) -> float | None:
        """The time of the next arrival if it is due by `now`."""
        return self.next_at if self.next_at <= now else None

    def fired(self) -> None:
        """The arrival at next_at ran (or was dropped): draw the next one."""
        self.next_at = self._after(self.next_at)

    def restart(self, now: float) -> None:
        """Arrivals due by `now` that did not run are void: start again at `now`
        (a look that reached MAX_PER_LOOK, or time the VF spent suspended)."""
        if self.next_at <= now:
            self.next_at = self._after(now)

    def set_rate(self, rate: float, now: float) -> None:
        if rate != self.rate:
            self.rate = rate
            self.next_at = self._after(now)
