"""`grpc-health-check`, the containers' and probes' health check: exit 0 only
for SERVING, 1 with one line on stderr for every other answer or none; over
mutual TLS with --tls-* or VFIO_TLS_* (what the compose file's health checks
and the Kubernetes exec probes of the mtls component run)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from grpcsvc.server import GrpcService
from grpcsvc.spawn import FWEMU, served
from grpcsvc.tls import ENV_CA, ENV_CERT, ENV_KEY
from tests.support import tls_mode
from tests.support.tls import TENANTS, Pki

pytestmark = pytest.mark.grpc

HEALTH_CHECK = [sys.executable, "-m", "grpcsvc.healthcheck"]


def health_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Never the VFIO_TLS_* of whoever runs the tests, only the test's own.
    clean = {k: v for k, v in os.environ.items() if k not in (ENV_CA, ENV_CERT, ENV_KEY)}
    return subprocess.run(
        [*HEALTH_CHECK, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**clean, **(env or {})},
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
    port = await service.start("127.0.0.1:0", tls_config=tls_mode.server_tls())
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


# --- over mutual TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_fwemu(pki: Pki) -> Iterator[str]:
    with served(
        FWEMU, "--vfs", "1", "--size", "64KiB", "--log-level", "warning", *pki.server_args()
    ) as (_, target):
        yield target


def test_a_client_certificate_passes_a_mutual_tls_service(pki: Pki, mtls_fwemu: str) -> None:
    done = health_check(*pki.client_args(TENANTS[0]), mtls_fwemu)
    assert done.returncode == 0, done.stderr
    assert "is SERVING" in done.stdout


def test_the_certificate_may_come_from_the_environment(pki: Pki, mtls_fwemu: str) -> None:
    c = pki.clients[TENANTS[0]]
    env = {ENV_CA: str(pki.ca), ENV_CERT: str(c.cert), ENV_KEY: str(c.key)}
    done = health_check(mtls_fwemu, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("how", ["plaintext", "no client certificate"])
def test_without_a_client_certificate_a_mutual_tls_service_is_unhealthy(
    pki: Pki, mtls_fwemu: str, how: str
) -> None:
    args = [] if how == "plaintext" else ["--tls-ca", str(pki.ca)]
    done = health_check("--timeout", "3", *args, mtls_fwemu)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("grpc-health-check: ")


def test_a_tls_file_that_cannot_be_read_is_a_usage_error(
    pki: Pki, mtls_fwemu: str, tmp_path: Path
) -> None:
    done = health_check("--tls-ca", str(tmp_path / "missing.pem"), mtls_fwemu)
    assert done.returncode == 2
    assert "cannot read the TLS CA" in done.stderr
