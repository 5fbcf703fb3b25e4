"""What the firmware counts, for metrics: plain numbers kept by the model
(no Prometheus here); `fwemu/service/metrics.py` exports them at scrape time,
so counting costs a dict update and nothing per scrape target."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

# Seconds; a SAVE of an 8 MiB chunk takes milliseconds, a whole large VF seconds.
SAVE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Histogram:
    """Cumulative-free bucket counts (the exporter sums them up), sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # len(bounds) + 1 (the last: +Inf)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) with +Inf last, as Prometheus wants."""
        out = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class FirmwareStats:
    commands: dict[tuple[int, int], int] = field(default_factory=dict)  # (opcode, status)
    save_seconds: Histogram = field(default_factory=lambda: Histogram(SAVE_BUCKETS))
    image_bytes_saved: int = 0  # by SAVEs that completed OK
    image_bytes_loaded: int = 0
    faults_injected: Counter[str] = field(default_factory=Counter)  # by kind name
    reconfigurations_retired: int = 0  # by VFs since destroyed (the rest: Vf.reconfigurations)
