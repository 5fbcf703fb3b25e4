"""`grpc-health-check`, the containers' and probes' health check: exit 0 only
for SERVING, 1 with one line on stderr for every other answer or none."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2

from grpcsvc.server import GrpcService
from grpcsvc.spawn import FWEMU, served

pytestmark = pytest.mark.grpc

HEALTH_CHECK = [sys.executable, "-m", "grpcsvc.healthcheck"]


def health_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HEALTH_CHECK, *args], capture_output=True, text=True, timeout=30, check=False
    )


def assert_unhealthy(done: subprocess.CompletedProcess[str], why: str) -> None:
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("grpc-health-check: ") and why in line, line


@pytest.fixture(scope="module")
def fwemu() -> Iterator[str]:
    with served(FWEMU, "--vfs", "1", "--size", "64KiB", "--log-level", "warning") as (_, target):
        yield target


@pytest.mark.parametrize("service", ["", "fwemu.api.v1.Firmware", "fwemu.api.v1.Scenario"])
def test_a_serving_fwemu_passes(fwemu: str, service: str) -> None:
    done = health_check("--service", service, fwemu)
    assert done.returncode == 0, done.stderr
    assert "is SERVING" in done.stdout and done.stderr == ""


def test_a_service_the_server_does_not_have_fails(fwemu: str) -> None:
    assert_unhealthy(health_check("--service", "vfio.v1.Vfio", fwemu), "unknown to the server")


def test_a_stopped_server_fails_as_unreachable() -> None:
    with served(FWEMU, "--vfs", "1", "--size", "64KiB", "--log-level", "warning") as (_, target):
        assert health_check(target).returncode == 0
    assert_unhealthy(health_check(target), "unreachable")


async def test_a_not_serving_server_fails() -> None:
    """What a service reports from SIGTERM on, before it stops."""
    service = GrpcService([], lambda server: None)
    port = await service.start("127.0.0.1:0")
    try:
        await service.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        proc = await asyncio.create_subprocess_exec(
            *HEALTH_CHECK,
            f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await service.stop(0)
    assert proc.returncode is not None
    done = subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())
    assert_unhealthy(done, "the server is NOT_SERVING")


def test_a_server_that_never_answers_fails_at_the_timeout() -> None:
    """A port that accepts connections but never speaks HTTP/2."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        assert_unhealthy(health_check("--timeout", "0.5", target), "no answer within 0.5 s")


@pytest.mark.parametrize("args", [[], ["--timeout", "0", "127.0.0.1:1"], ["--timeout", "x", "a:1"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert health_check(*args).returncode == 2
