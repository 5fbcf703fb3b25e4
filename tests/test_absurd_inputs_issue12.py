"""Absurd values for the inputs issues 12 and 14 added: each refused with a
clear error before anything is written or changed."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fwemu.link.ifc import VfConfig
from fwemu.link.scenario_requests import MAX_HOLDERS, MAX_PRINCIPAL_LEN, SetVfHoldersIn
from fwemu.model import Firmware, VirtualClock
from grpcsvc import tls
from vfioclient.cli import main as vfioctl


@pytest.mark.parametrize("days", ["0", "-1", "36501", "99999999999", "1e9", "nan"])
def test_certs_refuses_an_absurd_validity_and_writes_nothing(
    tmp_path: Path, days: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vfioctl(["certs", str(tmp_path / "pki"), "--days", days]) == 2
    assert "--days" in capsys.readouterr().err
    assert not (tmp_path / "pki").exists()


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "1e308", "86401"])
def test_exam_refuses_an_absurd_trap_timeout(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vfioctl(["exam", "--scenario", "127.0.0.1:1", "--trap-timeout", timeout]) == 2
    assert "--trap-timeout" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["999", "-1", "rw", "0o7777", "1000"])
def test_socket_mode_is_an_octal_file_mode(mode: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        tls._mode(mode)
    assert tls._mode("0660") == 0o660


def test_a_tls_file_too_large_or_not_pem_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    big.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * (tls.MAX_PEM + 10))
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x00" * 64)
    for path, why in ((big, "larger than"), (junk, "not PEM")):
        with pytest.raises(tls.TlsError, match=why):
            tls.ClientTls(str(path)).credentials()
    with pytest.raises(tls.TlsError, match="cannot read"):
        tls.ClientTls(str(tmp_path / "missing.pem")).credentials()


@pytest.mark.parametrize(
    "principals",
    [
        frozenset(f"p{i}" for i in range(MAX_HOLDERS + 1)),
        frozenset({"x" * (MAX_PRINCIPAL_LEN + 1)}),
        frozenset({""}),
    ],
    ids=["too-many", "too-long", "empty"],
)
def test_absurd_holders_are_refused_and_change_nothing(principals: frozenset[str]) -> None:
    fw = Firmware(VirtualClock())
    fw.create_vfs(1, VfConfig(size=64 << 10))
    fw.control(SetVfHoldersIn(1, frozenset({"team-a"})))
    with pytest.raises(ValueError, match="principals"):
        fw.control(SetVfHoldersIn(1, principals))
    assert fw.holders == {1: frozenset({"team-a"})}
