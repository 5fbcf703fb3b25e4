"""deploy/compose.yaml: valid against the compose specification; every
command of the project's image parses with the project's own CLI parsers and
names the other services by their real ports; start order follows health
checks; Prometheus scrapes exactly the metrics ports the services listen on;
Grafana's provisioning finds the dashboard. No Docker engine is to be had
here, so this is what checks the file."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.cli import _parser as driver_parser
from driver.service.server import VFIO_SERVICE
from fwemu.cli import _parser as fwemu_parser
from fwemu.scenario import load_scenario_file
from grpcsvc.healthcheck import _parser as healthcheck_parser
from tests.support.dockerfile import DOCKERFILE, ROOT
from tests.support.tools import passes, tool
from vfioclient.cli import build_parser as vfioctl_parser
from vfioclient.cli.demo import parser as demo_parser

DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"


def built_here() -> dict[str, dict[str, Any]]:
    """The services that run the project's image."""
    return {name: s for name, s in SERVICES.items() if "build" in s}


def parse_command(command: list[str]) -> argparse.Namespace:
    """The command as the image's console script would parse it (SystemExit on
    a flag it does not have)."""
    program, *args = command
    parsers: dict[str, Callable[[], argparse.ArgumentParser]] = {
        "fwemu": fwemu_parser,
        "vfio-driver": driver_parser,
        "vfioctl": vfioctl_parser,
    }
    if program == "vfioctl" and args[:1] == ["demo"]:
        return demo_parser().parse_args(args[1:])  # as vfioctl's main hands it over
    return parsers[program]().parse_args(args)


def port(address: str) -> int:
    return int(address.rpartition(":")[2])


def listen_ports(kind: str) -> dict[str, int]:
    """service -> the port of its `--listen` (gRPC) or `--metrics-listen` option."""
    ports = {}
    for name, service in built_here().items():
        address = getattr(parse_command(service["command"]), kind, None)
        if address:
            ports[name] = port(address)
    return ports


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path of a service's bind mounts (short syntax)."""
    found = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        found[container] = (COMPOSE_FILE.parent / host).resolve()
    return found


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a path inside a service's container comes from on this host."""
    for container, host in sorted(mounts(service).items(), key=lambda m: -len(m[0])):
        if container_path == container or container_path.startswith(container + "/"):
            return host / os.path.relpath(container_path, container)
    pytest.fail(f"nothing is mounted at {container_path}")


def test_the_compose_file_is_valid_against_the_compose_specification() -> None:
    check_jsonschema = tool("check-jsonschema", "PyPI check-jsonschema, in the test extra")
    passes([check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])


def test_the_project_services_build_deploy_dockerfile_from_the_repository_root() -> None:
    assert set(built_here()) == {"fwemu", "driver", "migrate"}
    for service in built_here().values():
        context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
        assert context == ROOT
        assert context / service["build"]["dockerfile"] == DOCKERFILE


@pytest.mark.parametrize("name", sorted(built_here()))
def test_every_command_parses_with_the_project_cli(name: str) -> None:
    try:
        parse_command(SERVICES[name]["command"])
    except SystemExit as e:
        pytest.fail(f"{name}: {SERVICES[name]['command']} does not parse (exit {e.code})")


def test_the_scenario_the_firmware_is_given_is_mounted_and_loads() -> None:
    scenario = parse_command(SERVICES["fwemu"]["command"]).scenario
    load_scenario_file(str(host_path(SERVICES["fwemu"], scenario)))


def test_every_address_of_another_service_is_its_listen_port() -> None:
    grpc_ports = listen_ports("listen")
    named = {
        "driver": ["firmware"],
        "migrate": ["driver", "scenario"],
    }
    for name, options in named.items():
        args = parse_command(SERVICES[name]["command"])
        for option in options:
            host, _, number = getattr(args, option).rpartition(":")
            assert grpc_ports[host] == int(number), f"{name} --{option}"
            assert host in SERVICES[name]["depends_on"], f"{name} starts before {host}"


def test_the_driver_moves_image_bytes_over_grpc() -> None:
    """Containers do not share /dev/shm: the firmware cannot map the driver's."""
    assert parse_command(SERVICES["driver"]["command"]).memory == "remote"


def test_the_health_checks_ask_each_service_on_its_own_port() -> None:
    for name, number in listen_ports("listen").items():
        test = SERVICES[name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "grpc-health-check"], name
        assert test[-1] == f"127.0.0.1:{number}", name


def test_the_drivers_health_follows_its_firmware() -> None:
    """The driver is healthy (and `migrate` starts) only while vfio.v1.Vfio is
    SERVING: NOT_SERVING while its firmware is unreachable; fwemu asks the
    server as a whole."""
    driver = SERVICES["driver"]["healthcheck"]["test"]
    assert driver[driver.index("--service") + 1] == VFIO_SERVICE
    assert healthcheck_parser().parse_args(driver[2:]).service == VFIO_SERVICE
    assert "--service" not in SERVICES["fwemu"]["healthcheck"]["test"]


def test_services_start_once_what_they_need_is_healthy_and_the_job_runs_once() -> None:
    for name, service in SERVICES.items():
        for needed, how in service.get("depends_on", {}).items():
            assert how == {"condition": "service_healthy"}, f"{name} -> {needed}"
            assert not SERVICES[needed]["healthcheck"].get("disable"), needed
    assert SERVICES["migrate"]["restart"] == "no"
    assert parse_command(SERVICES["migrate"]["command"]).driver == "driver:50052"


def test_other_images_are_pinned_to_a_version() -> None:
    for name, service in SERVICES.items():
        if "build" not in service:
            _, _, tag = service["image"].partition(":")
            assert tag and tag != "latest", f"{name}: {service['image']}"


def test_prometheus_scrapes_exactly_the_metrics_ports_of_the_services() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    metrics = listen_ports("metrics_listen")
    assert set(metrics) == {"fwemu", "driver"}
    assert targets == {f"{name}:{number}" for name, number in metrics.items()}
    prometheus = SERVICES["prometheus"]
    assert host_path(prometheus, "/etc/prometheus/prometheus.yml") == PROMETHEUS_CONFIG


def test_promtool_accepts_the_prometheus_config() -> None:
    """Skipped without promtool, but under CI (CI set) a failure: .ci/run installs it."""
    promtool = tool("promtool", "Debian package prometheus", optional=True)
    passes([promtool, "check", "config", str(PROMETHEUS_CONFIG)])


def test_grafana_provisions_the_dashboard_file_and_the_prometheus_datasource() -> None:
    grafana = SERVICES["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "vfio-migration.yaml").read_text())[
        "providers"
    ]
    dashboard_path = host_path(grafana, provider["options"]["path"] + "/vfio-migration.json")
    assert dashboard_path == DEPLOY / "grafana" / "vfio-migration.json"
    dashboard = json.loads(dashboard_path.read_text())
    assert dashboard["uid"] == "vfio-mlx5-migration"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home) == dashboard_path

    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    (variable,) = (v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert source["type"] == variable["query"] == "prometheus"
    assert source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in grafana["depends_on"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
