"""grpcsvc.collector: what the services' scrape-time collectors share."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from grpcsvc.collector import ScrapeCollector, per_item_series


class Counting(ScrapeCollector):
    def __init__(self) -> None:
        self.collected = 0

    def collect(self) -> Iterator[Metric]:
        self.collected += 1
        return per_item_series(
            "vf",
            ("things_done", "Things done, per VF."),
            ("thing_state", "State per VF."),
            [("1", 10, 3), ("2", 0, 1)],
        )


def test_registering_does_not_collect_and_a_scrape_does() -> None:
    registry = CollectorRegistry()
    c = Counting()
    registry.register(c)
    assert c.collected == 0
    generate_latest(registry)
    assert c.collected == 1


def test_per_item_series_are_a_counter_and_a_gauge_one_sample_per_item() -> None:
    registry = CollectorRegistry()
    registry.register(Counting())
    text = generate_latest(registry).decode()
    assert "# TYPE things_done_total counter" in text
    assert "# TYPE thing_state gauge" in text
    assert registry.get_sample_value("things_done_total", {"vf": "1"}) == 10
    assert registry.get_sample_value("things_done_total", {"vf": "2"}) == 0
    assert registry.get_sample_value("thing_state", {"vf": "1"}) == 3
    assert registry.get_sample_value("thing_state", {"vf": "2"}) == 1
