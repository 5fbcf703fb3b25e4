"""`fwemu serve` as a process, its security options (issue 12): no off-host
listener without TLS unless --insecure, and mutual TLS with the roles that
--admin-principals and --driver-principals name."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fwemu.api.v1 import firmware_pb2 as fpb
from fwemu.api.v1 import firmware_pb2_grpc as fgrpc
from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from grpcsvc import spawn
from grpcsvc.tls import sync_channel
from tests.support.tls import ADMIN, DRIVER, Pki

SMALL = ("--log-level", "warning", "--vfs", "2", "--size", "4KiB")


def test_an_off_host_address_without_tls_is_refused_clearly() -> None:
    r = subprocess.run(
        [*spawn.FWEMU, "--listen", "0.0.0.0:0", *SMALL],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert "refusing to listen on 0.0.0.0:0 without TLS" in r.stderr
    assert "--insecure" in r.stderr and "Traceback" not in r.stderr


def test_with_insecure_it_serves_off_host_without_tls() -> None:
    with spawn.served(spawn.FWEMU, "--listen", "0.0.0.0:0", "--insecure", *SMALL) as (_, target):
        assert target.startswith("0.0.0.0:")
        port = target.rpartition(":")[2]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="fwemu.api.v1.Firmware"), timeout=5
            )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.grpc
def test_mutual_tls_with_the_principals_the_flags_name(pki: Pki) -> None:
    """--driver-principals replaces the default driver: team-b may use the
    Firmware service, vfio-driver may not; the admin may, and sees every VF."""
    args = [*pki.server_args(), "--driver-principals", pki.principal("team-b"), *SMALL]
    with spawn.served(spawn.FWEMU, *args) as (_, target):

        def create_mkey(name: str) -> fpb.CreateMkeyResponse:
            with sync_channel(target, pki.client_tls(name)) as ch:
                request = fpb.CreateMkeyRequest(length=4096, remote=True)
                r: fpb.CreateMkeyResponse = fgrpc.FirmwareStub(ch).CreateMkey(request, timeout=5)
                return r

        def listed(name: str) -> list[int]:
            with sync_channel(target, pki.client_tls(name)) as ch:
                r = sgrpc.ScenarioStub(ch).ListVfs(spb.ListVfsRequest(), timeout=5)
                return [v.vhca_id for v in r.vfs]

        assert create_mkey("team-b").status == 0
        assert create_mkey(ADMIN).status == 0
        with pytest.raises(grpc.RpcError) as e:
            create_mkey(DRIVER)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert listed(ADMIN) == [1, 2]
        assert listed("team-a") == []


@pytest.mark.grpc
def test_the_demo_reaches_a_mutual_tls_firmware_with_an_admins_certificate(pki: Pki) -> None:
    """`fwemu demo --firmware` creates VFs: an admin's certificate may, a
    tenant's is refused with a clear error (exit 1)."""
    with spawn.served(spawn.FWEMU, *pki.server_args(), *SMALL) as (_, target):
        demo = [sys.executable, "-m", "fwemu.cli", "demo", "--firmware", target]
        demo += ["--size", "256KiB", "--dirty-rate", "64KiB", "--json"]
        ok = subprocess.run(
            [*demo, *pki.client_args(ADMIN)], capture_output=True, text=True, timeout=60
        )
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["equal"] is True
        refused = subprocess.run(
            [*demo, *pki.client_args("team-a")], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1
        assert "PERMISSION_DENIED" in refused.stderr and "Traceback" not in refused.stderr
