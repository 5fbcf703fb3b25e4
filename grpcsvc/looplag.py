"""How late a service's event loop runs: every call, stream message and
firmware answer of the service waits for that loop, so its lag is how long
they wait on top of their own work, whatever the cause (a burst of other
clients' messages, a long synchronous step, a CPU the process does not get).

A timer armed every INTERVAL_S notes how much later than asked it fired, into
the histogram `asyncio_event_loop_lag_seconds` of the service's registry
(exported with --metrics-listen), and the largest lag seen into the gauge
`asyncio_event_loop_lag_max_seconds`.  At 20 wake-ups a second it costs the
loop nothing measurable."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry, Gauge, Histogram

LAG = "asyncio_event_loop_lag_seconds"
LAG_MAX = "asyncio_event_loop_lag_max_seconds"
INTERVAL_S = 0.05
# Seconds: an idle loop is late by ~0.2 ms on average and a few ms at most
# (uvloop's timers have 1 ms resolution); a loop whose callers wait, by tens
# to hundreds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LoopLag:
    """The lag of the running loop, in `registry`; `start` it on the loop
    (GrpcService does), `stop` it before the loop ends."""

    def __init__(self, registry: CollectorRegistry, interval_s: float = INTERVAL_S) -> None:
        if not interval_s > 0:
            raise ValueError("the interval must be positive")
        self.interval_s = interval_s
        self.histogram = Histogram(
            LAG,
            "How much later than asked the service's event loop ran a timer (seconds): "
            "the wait every call and message of the service adds to its own work.",
            buckets=BUCKETS,
            registry=registry,
        )
        self.max = Gauge(
            LAG_MAX,
            "The largest lag of the service's event loop since it started (seconds).",
            registry=registry,
        )
        self._largest = 0.0
        self._task: asyncio.Task[None] | None = None

    def observe(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.histogram.observe(lag_s)
        if lag_s > self._largest:
            self._largest = lag_s
            self.max.set(lag_s)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.observe(loop.time() - asked)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
