"""What the services' own Prometheus collectors share: they read their
counters only when scraped, and their per-VF / per-device series (capped by
--metrics-per-vf / --metrics-per-device) are a counter and a gauge per item."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class ScrapeCollector(Collector):
    """A collector that reads its source when scraped, never at registration."""

    def describe(self) -> Iterable[Metric]:
        # Nothing: the registry then collects only when scraped, not at registration.
        return []


def per_item_series(
    label: str,
    counter: tuple[str, str],
    gauge: tuple[str, str],
    rows: Iterable[tuple[str, float, float]],
) -> Iterator[Metric]:
    """A counter and a gauge (each `(name, help)`) labelled `label`, one sample
    each per row `(label value, counter value, gauge value)`; the caller caps
    the rows."""
    count = CounterMetricFamily(*counter, labels=[label])
    level = GaugeMetricFamily(*gauge, labels=[label])
    for item, n, value in rows:
        count.add_metric([item], n)
        level.add_metric([item], value)
    yield count
    yield level
