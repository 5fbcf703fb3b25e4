"""`vfio-driver serve`'s security options (issue 12): no off-host listener
without TLS unless --insecure (exit 1 naming the way out), --admin-principals
(admins reach every VF's Scenario requests; a tenant only the VF it holds),
and --firmware-tls-* for the link to a `fwemu serve` with mutual TLS (only
with a firmware link)."""

from __future__ import annotations

import errno

import grpc
import pytest

from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from grpcsvc.spawn import DRIVER, FWEMU, start, stop
from tests.driver.service.tenancy import A, B, TenantClient
from tests.driver.test_cli import run_main
from tests.support.driver_service import errno_of
from tests.support.tls import ADMIN, Pki
from tests.support.tls import DRIVER as DRIVER_CERT

pytestmark = pytest.mark.grpc

QUIET = ["--log-level", "warning"]


def test_an_off_host_listener_without_tls_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run_main(capsys, "--listen", "0.0.0.0:0", "--vfs", "1")
    assert rc == 1 and "without TLS" in err and "--insecure" in err
    assert "Traceback" not in err


def test_an_off_host_listener_with_insecure_serves() -> None:
    proc, target = start([*DRIVER, *QUIET, "--listen", "0.0.0.0:0", "--insecure", "--vfs", "1"])
    rc, err = stop(proc)
    assert target.startswith("0.0.0.0:") and rc == 0, err


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--firmware-tls-ca", "ca.pem"], "--firmware-tls-* are for a firmware link"),
        (["--firmware", "127.0.0.1:1", "--firmware-tls-cert", "c.pem"], "needs its key"),
    ],
)
def test_firmware_tls_options_are_checked(
    capsys: pytest.CaptureFixture[str], args: list[str], expect: str
) -> None:
    rc, err = run_main(capsys, *args)
    assert rc == 2 and expect in err, err


async def test_admin_principals_reach_every_vf_and_tenants_their_own(pki: Pki) -> None:
    """Embedded firmware with --scenario-service, mutual TLS, --admin-principals."""
    argv = [*DRIVER, *QUIET, "--listen", "127.0.0.1:0", *pki.server_args()]
    proc, target = start([*argv, "--vfs", "2", "--size", "64KiB", "--scenario-service"])
    clients: list[TenantClient] = []
    try:
        for name in (A, B, ADMIN):
            clients.append(await TenantClient.of(target, pki.client_tls(name)))
        a, b, admin = clients
        devices = await a.list_devices()
        fd = await a.open_device(devices[0].name)
        assert await errno_of(admin.open_device(devices[0].name)) == errno.EBUSY
        vhca_id = devices[0].vhca_id

        def digest(c: TenantClient) -> grpc.aio.UnaryUnaryCall[object, object]:
            stub = sgrpc.ScenarioStub(c.channel)
            return stub.GetDigest(spb.GetDigestRequest(vhca_id=vhca_id))  # type: ignore[return-value]

        assert (await digest(a)).digest  # type: ignore[attr-defined]
        assert (await digest(admin)).digest  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError):
            await digest(b)
        await a.close(fd)
    finally:
        for c in clients:
            await c.close_channel()
        rc, err = stop(proc)
    assert rc == 0 and "Traceback" not in err, err


async def test_the_firmware_link_over_mutual_tls(pki: Pki) -> None:
    """fwemu and vfio-driver as processes, every hop with mutual TLS: the
    driver's link presents its own certificate (--firmware-tls-*)."""
    fw, fw_target = start(
        [*FWEMU, *QUIET, "--listen", "127.0.0.1:0", *pki.server_args(), "--vfs", "1"]
    )
    try:
        drv, target = start(
            [
                *DRIVER,
                *QUIET,
                "--listen",
                "127.0.0.1:0",
                *pki.server_args(),
                "--firmware",
                fw_target,
                *pki.client_args(DRIVER_CERT, "firmware-tls"),
            ]
        )
        try:
            a = await TenantClient.of(target, pki.client_tls(A))
            (dev,) = await a.list_devices()
            fd = await a.open_device(dev.name)
            await a.close(fd)
            await a.close_channel()
        finally:
            rc, err = stop(drv)
        assert rc == 0 and "Traceback" not in err, err
    finally:
        stop(fw)
