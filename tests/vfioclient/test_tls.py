"""The clients over mutual TLS against real services: the library (async,
sync, Scenario), vfioctl's global --tls-* options on every connection it
makes (driver, firmware Scenario services, the demo), VFIO_TLS_* as the
fallback, and what a client without a certificate gets.

The driver runs as its own process (`vfio-driver serve --scenario-service`,
embedded firmware, no workload) with the session's development PKI
(tests/support/tls.py): server certificate, client CA, lab-admin as admin.
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import Iterator

import pytest

from driver.shards import pci_name
from driver.vfio.uapi import MigState
from grpcsvc import spawn
from grpcsvc.tls import ENV_CA, ENV_CERT, ENV_KEY
from tests.support.tls import ADMIN, TENANTS, Pki
from vfioclient import VfioClient, VfioClientError
from vfioclient.cli import main as vfioctl
from vfioclient.scenario import ScenarioClient, ScenarioClientError
from vfioclient.sync import SyncVfioClient

pytestmark = pytest.mark.grpc

TENANT = TENANTS[0]


@pytest.fixture(autouse=True)
def no_tls_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: never the VFIO_TLS_* of whoever runs the tests."""
    for name in (ENV_CA, ENV_CERT, ENV_KEY):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def driver(pki: Pki) -> Iterator[str]:
    argv = [
        *spawn.DRIVER, "--listen", "127.0.0.1:0", "--vfs", "3", "--size", "256KiB",
        "--dirty-rate", "0", "--scenario-service", "--loop", "asyncio", "--log-level", "error",
        *pki.server_args(),
    ]  # fmt: skip
    proc, target = spawn.start(argv, "vfio-driver")
    try:
        yield target
    finally:
        spawn.stop(proc, 10)


def use_environment(monkeypatch: pytest.MonkeyPatch, pki: Pki, name: str) -> None:
    c = pki.clients[name]
    monkeypatch.setenv(ENV_CA, str(pki.ca))
    monkeypatch.setenv(ENV_CERT, str(c.cert))
    monkeypatch.setenv(ENV_KEY, str(c.key))


def digests(target: str, pki: Pki, *vhca_ids: int) -> list[str]:
    async def go() -> list[str]:
        async with await ScenarioClient.connect(target, tls=pki.client_tls(ADMIN)) as s:
            return [await s.digest(v) for v in vhca_ids]

    return asyncio.run(go())


# --- the library ---------------------------------------------------------------------------


async def test_the_library_drives_a_device_with_a_client_certificate(pki: Pki, driver: str) -> None:
    async with await VfioClient.connect(driver, tls=pki.client_tls(TENANT)) as c:
        assert [d.name for d in await c.list_devices()] == [pci_name(k) for k in (1, 2, 3)]
        fd = await c.open_device(pci_name(3))
        assert await c.get_state(fd) is MigState.RUNNING
        assert await c.data_size(fd) > 0
        await c.close(fd)


@pytest.mark.parametrize("how", ["plaintext", "no client certificate"])
async def test_without_a_client_certificate_the_library_cannot_connect(
    pki: Pki, driver: str, how: str
) -> None:
    tls = None if how == "plaintext" else pki.client_tls(None)
    with pytest.raises(VfioClientError) as e:
        await VfioClient.connect(driver, tls=tls, timeout=5)
    assert e.value.errno == errno.ENOTCONN


async def test_the_library_takes_its_tls_from_the_environment_unless_told_otherwise(
    pki: Pki, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, pki, TENANT)
    async with await VfioClient.connect(driver) as c:
        assert c.tls is not None and c.tls.cert == str(pki.clients[TENANT].cert)
        assert len(await c.list_devices()) == 3
    with pytest.raises(VfioClientError):  # tls=None: plaintext, whatever the environment says
        await VfioClient.connect(driver, tls=None, timeout=5)


def test_the_sync_client_over_mutual_tls(pki: Pki, driver: str) -> None:
    with SyncVfioClient.connect(driver, tls=pki.client_tls(TENANT)) as c:
        assert len(c.list_devices()) == 3
    with pytest.raises(VfioClientError):
        SyncVfioClient.connect(driver, tls=pki.client_tls(None), timeout=5)


async def test_the_scenario_client_over_mutual_tls(
    pki: Pki, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await ScenarioClient.connect(driver, tls=pki.client_tls(ADMIN)) as s:
        assert [v.vhca_id for v in await s.list_vfs()] == [1, 2, 3]
    with pytest.raises(ScenarioClientError) as e:
        await ScenarioClient.connect(driver, tls=pki.client_tls(None), timeout=5)
    assert e.value.errno == errno.ECONNREFUSED
    use_environment(monkeypatch, pki, ADMIN)
    async with await ScenarioClient.connect(driver) as s:
        assert len(await s.list_vfs()) == 3


# --- vfioctl ---------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = vfioctl(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_vfioctl_with_tls_options(
    pki: Pki, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, *pki.client_args(TENANT), "--driver", driver, "--json", "list")
    assert rc == 0, err
    assert len(json.loads(out)["devices"]) == 3


def test_vfioctl_without_a_certificate_fails_and_says_what_tls_needs(
    pki: Pki, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(capsys, "--driver", driver, "--timeout", "5", "list")
    assert rc == 1
    assert "ENOTCONN" in err and "--tls-cert" in err
    rc, _, err = run(capsys, "--tls-ca", str(pki.ca), "--driver", driver, "--timeout", "5", "list")
    assert rc == 1 and "--tls-cert" in err


def test_vfioctl_takes_the_environment(
    pki: Pki, driver: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, pki, TENANT)
    rc, _, err = run(capsys, "--driver", driver, "show", pci_name(1))
    assert rc == 0, err


def test_vfioctl_refuses_a_certificate_without_its_key(
    pki: Pki, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = str(pki.clients[TENANT].cert)
    rc, _, err = run(capsys, "--tls-cert", cert, "--driver", driver, "list")
    assert rc == 1 and "EINVAL" in err and "key" in err


def test_vfioctl_migrates_and_verifies_over_mutual_tls(
    pki: Pki, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The digests come over the Scenario service, a second connection with
    the same certificate: the one principal holds both devices."""
    before = digests(driver, pki, 2)
    rc, out, err = run(
        capsys, *pki.client_args(TENANT), "--driver", driver, "--json",
        "migrate", pci_name(1), pci_name(2), "--verify", "yes",
    )  # fmt: skip
    assert rc == 0, err
    report = json.loads(out)
    assert report["status"] == "completed" and report["verified"] is True
    src, dst = digests(driver, pki, 1, 2)
    assert src == dst != before[0]


def test_vfioctl_scenario_over_mutual_tls(
    pki: Pki, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, *pki.client_args(ADMIN), "--driver", driver, "--json",
                       "scenario", "vfs")  # fmt: skip
    assert rc == 0, err
    assert [v["vhca_id"] for v in json.loads(out)["vfs"]] == [1, 2, 3]


def test_vfioctl_demo_against_running_services_over_mutual_tls(
    pki: Pki, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The global --tls-* options reach the demo (as compose runs it, with VFIO_TLS_*)."""
    rc, out, err = run(
        capsys, *pki.client_args(ADMIN), "demo", "--driver", driver, "--scenario", driver, "--json"
    )
    assert rc == 0, err
    result = json.loads(out)
    assert result["equal"] and result["report"]["status"] == "completed"


def test_the_embedded_demo_stays_plaintext(
    pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its services are in-process on loopback: VFIO_TLS_* do not apply, and
    --tls-* without --driver is a usage error."""
    use_environment(monkeypatch, pki, TENANT)
    rc, out, err = run(capsys, "demo", "--size", "1MiB", "--dirty-rate", "256KiB", "--json")
    assert rc == 0, err
    assert json.loads(out)["equal"]
    with pytest.raises(SystemExit) as e:
        vfioctl(["demo", "--tls-ca", str(pki.ca)])
    assert e.value.code == 2 and "need --driver" in capsys.readouterr().err


def test_usage_errors_still_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """vfioctl parses known options first (for `vfioctl --tls-... demo ...`):
    extra words after any other command are still errors."""
    rc, _, err = run(capsys, "--tls-ca", "x", "list", "--bogus")
    assert rc == 2 and "unrecognized arguments: --bogus" in err
