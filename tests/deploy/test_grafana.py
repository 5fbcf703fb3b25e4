"""deploy/grafana/vfio-migration.json as Grafana lays it out and Prometheus
parses it: unique panel ids, panels inside the 24-column grid without
overlap, rows expanded (so every panel is a top-level one, which
tests/observability/test_dashboard.py checks against the services' metrics),
every query valid PromQL by promtool, and the load-run row asking what a
REINIT load run is judged by: REINIT detection latency (p50, p99 of
vfio_reinit_detection_seconds), REINIT and PRECOPY_INFO answers per second,
errors by errno, open devices and data streams."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dockerfile import ROOT
from tests.support.tools import tool

DASHBOARD_FILE = ROOT / "deploy" / "grafana" / "vfio-migration.json"
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
PANELS: list[dict[str, Any]] = DASHBOARD["panels"]
GRID_COLUMNS = 24
LOAD_ROW = "Load runs (vfio-loadtest)"
# Grafana's interval variables, and what promtool gets instead.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def exprs() -> list[str]:
    return [t["expr"] for p in PANELS for t in p.get("targets", [])]


def row_panels(title: str) -> list[dict[str, Any]]:
    """The panels below the row called `title`, up to the next row."""
    (start,) = [i for i, p in enumerate(PANELS) if p["type"] == "row" and p["title"] == title]
    found = []
    for p in PANELS[start + 1 :]:
        if p["type"] == "row":
            break
        found.append(p)
    return found


def test_panel_ids_are_unique_and_the_grid_has_no_overlap() -> None:
    ids = [p["id"] for p in PANELS]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], int] = {}
    for p in PANELS:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= GRID_COLUMNS, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[(x, y)] = p["id"]


def test_panels_follow_the_dashboards_conventions() -> None:
    """Rows are expanded and hold no panels of their own (a collapsed row's
    panels would hide from the metric check); every query panel and target
    asks the dashboard's datasource variable, each target has its refId and
    a legend, each panel a unit."""
    (variable,) = [v for v in DASHBOARD["templating"]["list"] if v["type"] == "datasource"]
    source = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    rows = [p for p in PANELS if p["type"] == "row"]
    assert rows
    for row in rows:
        assert row["collapsed"] is False and row["panels"] == [] and "targets" not in row
        assert row["gridPos"]["w"] == GRID_COLUMNS and row["gridPos"]["x"] == 0
    for p in PANELS:
        if p["type"] == "row":
            continue
        assert p["type"] == "timeseries" and p["datasource"] == source, p["title"]
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == source and t["legendFormat"], (p["title"], t["refId"])


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule; Grafana's
    interval variables replaced by durations). Skipped without promtool,
    but under CI a failure: .ci/run installs it."""
    promtool = tool("promtool", "Debian package prometheus", optional=True)
    rules = []
    for i, expr in enumerate(exprs()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable promtool cannot stand in for: {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout, done.stdout
    # Not a rubber stamp: promtool refuses a broken expression.
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(("}]}]})
    )
    bad = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, timeout=60)
    assert bad.returncode != 0


def _targets(panel: dict[str, Any]) -> dict[str, str]:
    """legend -> expression, whitespace squeezed."""
    return {t["legendFormat"]: re.sub(r"\s+", " ", t["expr"]) for t in panel["targets"]}


def _by_title(panels: list[dict[str, Any]], word: str) -> dict[str, Any]:
    (found,) = [p for p in panels if word.lower() in p["title"].lower()]
    return found


def test_the_load_run_row_shows_what_a_reinit_load_run_is_judged_by() -> None:
    panels = row_panels(LOAD_ROW)
    assert len(panels) == 4
    bucket = "vfio_reinit_detection_seconds_bucket[$__rate_interval]"
    latency = _by_title(panels, "REINIT detection latency")
    assert latency["fieldConfig"]["defaults"]["unit"] == "s"
    q = _targets(latency)
    assert q["p50"] == f"histogram_quantile(0.5, sum by (le) (rate({bucket})))"
    assert q["p99"] == f"histogram_quantile(0.99, sum by (le) (rate({bucket})))"
    assert q["mean"] == (
        "sum(rate(vfio_reinit_detection_seconds_sum[$__rate_interval])) / "
        "sum(rate(vfio_reinit_detection_seconds_count[$__rate_interval]))"
    )
    answers = _by_title(panels, "PRECOPY_INFO answers")
    assert answers["fieldConfig"]["defaults"]["unit"] == "ops"
    assert _targets(answers) == {
        "REINIT answers": 'sum(rate(vfio_precopy_info_total{reinit="true"}[$__rate_interval]))',
        "PRECOPY_INFO answers": "sum(rate(vfio_precopy_info_total[$__rate_interval]))",
    }
    errors = _by_title(panels, "errno")
    assert _targets(errors) == {
        "{{errno}}": "sum by (errno) (rate(vfio_errors_total[$__rate_interval]))"
    }
    devices = _by_title(panels, "open devices")
    assert set(_targets(devices).values()) >= {
        "sum(vfio_open_devices)",
        "sum(vfio_open_data_streams)",
    }


@pytest.mark.parametrize("title", [LOAD_ROW])
def test_the_row_comes_after_every_panel_above_it(title: str) -> None:
    """Grafana puts a panel in the row whose header is above it: the row's
    header is below every panel before it in the list, and its panels below
    the header."""
    (i,) = [n for n, p in enumerate(PANELS) if p["type"] == "row" and p["title"] == title]
    header = PANELS[i]["gridPos"]["y"]
    assert all(p["gridPos"]["y"] + p["gridPos"]["h"] <= header for p in PANELS[:i])
    assert all(p["gridPos"]["y"] > header for p in row_panels(title))


# --- the Errors panel and the datasource -------------------------------------------------------

DATASOURCE_FILE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
# The streams a client ends with CANCELLED when it is done with them.
NORMALLY_CANCELLED = [("vfio.v1.Vfio", "Session"), ("vfio.v1.Vfio", "ReadIntoStream")]


def test_the_datasource_interval_is_the_scrape_interval_and_under_a_migration() -> None:
    """Grafana's $__rate_interval is at least 4 x the datasource's
    timeInterval (Grafana's default 15 s without it: a minute); a migration
    takes well under a second, so the scrape interval is short and the
    datasource says so."""
    (source,) = yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"]
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape
    assert re.fullmatch(r"[1-5]s", scrape), scrape
    assert "$__rate_interval" in " ".join(exprs())


def _grpc_errors_expr() -> str:
    (panel,) = [p for p in PANELS if p["title"] == "Errors"]
    (target,) = [t for t in panel["targets"] if "grpc_server_handled_total" in t["expr"]]
    return str(target["expr"])


def test_the_errors_panel_leaves_out_only_the_normal_cancelled_of_the_streams(
    tmp_path: Path,
) -> None:
    """promtool evaluates the panel's gRPC query over made-up counters: the
    CANCELLED of Session and ReadIntoStream (vfio.v1.Vfio) is left out; any
    other code of theirs, a CANCELLED of another method or of a method of
    that name in another service, counts; OK never does."""
    promtool = tool("promtool", "Debian package prometheus", optional=True)
    expr = _grpc_errors_expr().replace("$__rate_interval", "1m")
    labels = ("grpc_service", "grpc_method", "grpc_code")
    normal = [(service, method, "CANCELLED") for service, method in NORMALLY_CANCELLED]
    counted = [
        ("vfio.v1.Vfio", "Session", "UNAVAILABLE"),
        ("vfio.v1.Vfio", "ReadIntoStream", "INTERNAL"),
        ("vfio.v1.Vfio", "SetState", "CANCELLED"),
        ("fwemu.api.v1.Firmware", "Session", "CANCELLED"),
    ]
    ok = [("vfio.v1.Vfio", "Session", "OK")]

    def series(values: tuple[str, str, str]) -> str:
        matchers = ",".join(f'{k}="{v}"' for k, v in zip(labels, values, strict=True))
        return f'grpc_server_handled_total{{grpc_type="server_stream",{matchers}}}'

    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                # 60 more a minute: a rate of 1 per second.
                "input_series": [
                    {"series": series(v), "values": "0+60x10"} for v in normal + counted + ok
                ],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "5m",
                        "exp_samples": [
                            {"labels": "{" + ",".join(
                                f'{k}="{x}"' for k, x in zip(labels, v, strict=True)
                            ) + "}", "value": 1}
                            for v in counted
                        ],
                    }
                ],
            }
        ],
    }  # fmt: skip
    path = tmp_path / "errors_test.yml"
    path.write_text(yaml.safe_dump(tests))
    done = subprocess.run(
        [promtool, "test", "rules", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # Not a rubber stamp: the query as it was (every code but OK) fails it.
    bare = "sum by (grpc_service, grpc_method, grpc_code) " + (
        '(rate(grpc_server_handled_total{grpc_code!="OK"}[1m]))'
    )
    tests["tests"][0]["promql_expr_test"][0]["expr"] = bare  # type: ignore[index]
    path.write_text(yaml.safe_dump(tests))
    bad = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, timeout=60)
    assert bad.returncode != 0
