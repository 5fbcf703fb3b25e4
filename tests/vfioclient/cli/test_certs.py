"""`vfioctl certs`: what it writes works end to end (fwemu and a driver on its
firmware link, both with mutual TLS, a vfioctl and a probe connecting with
the client certificates), the principals it announces are the ones the
services see, and an existing CA is never replaced by accident."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from driver.shards import pci_name
from grpcsvc import spawn
from grpcsvc.certs import spiffe_id
from grpcsvc.tls import ENV_CA, ENV_CERT, ENV_KEY
from vfioclient.cli import main as vfioctl

pytestmark = pytest.mark.grpc

QUIET = ("--log-level", "error", "--loop", "asyncio")


def certs(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    rc = vfioctl(["--json", "certs", *argv])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if out else None, err


def principal_of(cert: str) -> str:
    c = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris:
        return str(uris[0])
    return str(c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def test_it_writes_a_ca_a_server_and_the_default_clients(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, doc, err = certs(capsys, str(tmp_path), "--server-host", "fwemu")
    assert rc == 0, err
    assert doc["ca"]["created"] is True
    assert doc["server"]["hosts"] == ["fwemu", "localhost", "127.0.0.1", "::1"]
    assert set(doc["clients"]) == {"vfio-driver", "vfioctl", "admin"}
    for name, c in doc["clients"].items():
        assert principal_of(c["cert"]) == c["principal"], name
    assert doc["clients"]["vfio-driver"]["principal"] == "vfio-driver"
    assert doc["clients"]["admin"]["principal"] == spiffe_id("admin")
    for f in [doc["ca"]["key"], doc["server"]["key"], *(c["key"] for c in doc["clients"].values())]:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    assert doc["flags"]["fwemu"] == [
        "--driver-principals", "vfio-driver", "--admin-principals", spiffe_id("admin"),
    ]  # fmt: skip


def test_the_certificates_it_writes_work_end_to_end(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """fwemu and a driver on it, both serving mutual TLS, the driver's
    firmware link with its CN-only certificate (fwemu's default driver
    principal); vfioctl and grpc-health-check with the printed flags."""
    rc, doc, err = certs(capsys, str(tmp_path))
    assert rc == 0, err
    flags = doc["flags"]
    with contextlib.ExitStack() as stack:
        _, fw = stack.enter_context(
            spawn.served(spawn.FWEMU, "--vfs", "2", "--size", "256KiB", "--dirty-rate", "0",
                         *QUIET, *flags["server"], *flags["fwemu"])
        )  # fmt: skip
        _, drv = stack.enter_context(
            spawn.served(spawn.DRIVER, "--firmware", fw, "--memory", "remote", *QUIET,
                         "--firmware-wait", "10",  # as deployed: a slow first handshake is retried
                         *flags["server"], *flags["driver_firmware_link"])
        )  # fmt: skip
        rc = vfioctl([*flags["client"], "--driver", drv, "--json", "list"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert [d["name"] for d in json.loads(out)["devices"]] == [pci_name(1), pci_name(2)]
        for target in (fw, drv):
            done = subprocess.run(
                [sys.executable, "-m", "grpcsvc.healthcheck", *flags["client"], target],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            refused = subprocess.run(
                [sys.executable, "-m", "grpcsvc.healthcheck", "--timeout", "3", target],
                capture_output=True, text=True, timeout=30, check=False,
                env={k: v for k, v in os.environ.items() if k not in (ENV_CA, ENV_CERT, ENV_KEY)},
            )  # fmt: skip
            assert refused.returncode == 1


def test_an_existing_ca_is_refused_unless_forced(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert certs(capsys, str(tmp_path))[0] == 0
    ca = (tmp_path / "ca.pem").read_bytes()
    rc, doc, err = certs(capsys, str(tmp_path))
    assert rc == 1 and doc["error"]["name"] == "EEXIST"
    assert "--force" in err and "--keep-ca" in err
    assert (tmp_path / "ca.pem").read_bytes() == ca
    rc, doc, _ = certs(capsys, str(tmp_path), "--force")
    assert rc == 0 and doc["ca"]["created"] is True
    assert (tmp_path / "ca.pem").read_bytes() != ca


def test_keep_ca_issues_from_the_existing_ca(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """What the compose file's one-shot job runs on every `up`."""
    assert certs(capsys, str(tmp_path), "--keep-ca")[1]["ca"]["created"] is True
    ca = (tmp_path / "ca.pem").read_bytes()
    rc, doc, err = certs(capsys, str(tmp_path), "--keep-ca", "--client", "probe")
    assert rc == 0, err
    assert doc["ca"]["created"] is False and (tmp_path / "ca.pem").read_bytes() == ca
    issuer = x509.load_pem_x509_certificate(ca)
    probe = x509.load_pem_x509_certificate((tmp_path / "probe.pem").read_bytes())
    probe.verify_directly_issued_by(issuer)


@pytest.mark.parametrize(
    "argv",
    [
        ["--client", "../escape"],
        ["--client", "ca"],
        ["--server-host", "a b"],
        ["--days", "0"],
        ["--force", "--keep-ca"],
    ],
)
def test_bad_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    assert vfioctl(["certs", str(tmp_path), *argv]) == 2
    assert not any(tmp_path.iterdir())


def test_its_help_comes_from_its_docstring(capsys: pytest.CaptureFixture[str]) -> None:
    assert vfioctl(["--help"]) == 0
    assert "write a development CA and certificates for mutual TLS" in capsys.readouterr().out
    assert vfioctl(["certs", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--server-host" in out and "--keep-ca" in out and "spiffe://" in out
