"""The Grafana dashboard in deploy/ asks only for metrics the services really
export, and both expositions pass `promtool check metrics`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from grpcsvc.spawn import DRIVER
from tests.support.exposition import exported_names, sample_names
from tests.support.promtool import check_metrics
from tests.support.scrape import Served, firmware_and_driver, served
from tests.support.vfioclient_e2e import Topology, rig
from vfioclient import VfioClient
from vfioclient.migration import migrate

pytestmark = pytest.mark.grpc

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "vfio-migration.json"

# PromQL words that are not metric names.
FUNCTIONS_AND_KEYWORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "topk", "bottomk", "delta", "deriv", "abs", "clamp_min", "clamp_max", "offset", "bool",
}  # fmt: skip


def queries(dashboard: dict) -> Iterator[str]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label matchers, grouping
    labels, ranges and strings taken out first)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    words = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)
    return {w for w in words if w not in FUNCTIONS_AND_KEYWORDS}


def test_metric_names_parses_promql() -> None:
    e = 'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y",b!="c"}[$__rate_interval])))'
    assert metric_names(e) == {"a_bucket"}
    assert metric_names("sum(rate(x_total[5m])) / sum(y)") == {"x_total", "y"}


@pytest.fixture(name="services", scope="module")
def services_fixture() -> Iterator[tuple[Served, Served, Served]]:
    """fwemu + a driver over it, and a driver with its firmware embedded."""
    with firmware_and_driver() as (fw, drv), served(DRIVER, "--vfs", "2") as embedded:
        yield fw, drv, embedded


async def test_every_dashboard_query_names_an_exported_metric(
    services: tuple[Served, Served, Served],
) -> None:
    fw, drv, _ = services
    async with rig(Topology(fw.target, drv.target, drv.target)) as r:
        (p,) = await r.pairs(1)
        await migrate([p.pair], r.digest_hook([p]))  # every family has samples now
    exported = exported_names(await fw.ascrape()) | exported_names(await drv.ascrape())
    dashboard = json.loads(DASHBOARD.read_text())
    names = {n for q in queries(dashboard) for n in metric_names(q)}
    assert names, "the dashboard has no queries"
    assert sorted(names - exported) == []
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("throughput", "reinit", "precopy-info latency", "save latency", "errors"):
        assert topic in titles


async def test_both_expositions_pass_promtool(services: tuple[Served, Served, Served]) -> None:
    for s in services:
        check_metrics(await s.ascrape())


async def test_embedded_driver_exports_the_firmware_metrics_too(
    services: tuple[Served, Served, Served],
) -> None:
    embedded = services[2]
    async with await VfioClient.connect(embedded.target) as c:
        assert len(await c.list_devices()) == 2
    names = sample_names(await embedded.ascrape())
    assert {"fwemu_vfs", "vfio_devices", "grpc_server_started_total"} <= names
