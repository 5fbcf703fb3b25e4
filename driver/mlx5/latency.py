"""A latency histogram the driver keeps per device (pure: the metrics
collector turns it into Prometheus' histogram; driver/service/metrics.py)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds: from a precopy ioctl's own cost to an orchestrator that polls
# PRECOPY_INFO once a second or slower.  An ioctl over the embedded firmware
# takes 70-90 us, over a fwemu process ~0.5 ms: the first buckets tell them apart.
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


@dataclass
class LatencyHistogram:
    """Observations counted in BUCKETS (each count is of its bucket alone,
    not cumulative; the last is +Inf), and their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def add(self, other: LatencyHistogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(list(self.counts), self.total)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus' buckets: (le, observations <= le), +Inf last."""
        out, running = [], 0
        for le, n in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((le, running))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)
