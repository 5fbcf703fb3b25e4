"""`fwemu serve` as a process: health, reflection, clean shutdown, clear errors."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grpcsvc import spawn


@pytest.fixture
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    with spawn.served(spawn.FWEMU, "--log-level", "warning", "--vfs", "3", "--size", "64KiB") as s:
        yield s


def test_health_reports_serving_for_both_services(
    served: tuple[subprocess.Popen[str], str],
) -> None:
    _, target = served
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "fwemu.api.v1.Firmware", "fwemu.api.v1.Scenario"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(served: tuple[subprocess.Popen[str], str]) -> None:
    _, target = served
    with grpc.insecure_channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        # v1 too, with v1alpha's messages (the same bytes on the wire)
        v1 = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (resp_v1,) = list(v1(iter([req]), timeout=5))
    assert {"fwemu.api.v1.Firmware", "fwemu.api.v1.Scenario", "grpc.health.v1.Health"} <= names
    assert {s.name for s in resp_v1.list_services_response.service} == names


def test_sigterm_stops_cleanly(served: tuple[subprocess.Popen[str], str]) -> None:
    proc, _ = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_port_in_use_is_a_clear_error(served: tuple[subprocess.Popen[str], str]) -> None:
    _, target = served
    r = subprocess.run(
        [*spawn.FWEMU, "--listen", target, "--vfs", "1", "--size", "4KiB"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert "address already in use" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("vfs: [{count: 0}]", "vfs.0.count"),
        ("vfs: [{size: 12XB}]", "vfs.0.size"),
        ("- just\n- a list\n", "a scenario is a mapping"),
        ("seed: [unclosed", "not valid YAML"),
        ("events: [{vf: 1, fault: {kind: explode}}]", "events.0.fault.kind"),
        ("vfs: [{count: 1}]\nevents: [{vf: 9, reconfigure: {}}]", "no VF with vhca_id 9"),
    ],
)
def test_bad_scenario_file_is_refused_with_the_field(
    tmp_path: Path, content: str, expect: str
) -> None:
    f = tmp_path / "scenario.yaml"
    f.write_text(content)
    r = subprocess.run(
        [*spawn.FWEMU, "--scenario", str(f)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    assert expect in r.stderr
    assert "Traceback" not in r.stderr


def test_binary_scenario_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "junk.bin"
    f.write_bytes(bytes(range(256)) * 4)
    r = subprocess.run(
        [*spawn.FWEMU, "--scenario", str(f)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "junk.bin" in r.stderr and "Traceback" not in r.stderr


def test_missing_scenario_file_is_refused() -> None:
    r = subprocess.run(
        [*spawn.FWEMU, "--scenario", "/nonexistent/s.yaml"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "cannot read scenario" in r.stderr


def test_bad_size_flag_is_refused() -> None:
    r = subprocess.run([*spawn.FWEMU, "--size", "lots"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "is not a size" in r.stderr
