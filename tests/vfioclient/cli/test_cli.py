"""vfioctl: each subcommand's success path, --json, and the exit codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from driver.shards import pci_name
from tests.support.vfioctl_driver import Driver, run_vfioctl
from vfioclient.cli import main

pytestmark = pytest.mark.grpc


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def jrun(capsys: pytest.CaptureFixture[str], driver: Driver, *argv: str) -> Any:
    rc, out, err = run(capsys, "--driver", driver.target, "--json", *argv)
    assert rc == 0, err
    return json.loads(out)


def test_list(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--driver", driver.target, "list")
    assert rc == 0
    assert pci_name(1) in out and "STOP_COPY,P2P,PRE_COPY" in out
    doc = jrun(capsys, driver, "list")
    assert [d["name"] for d in doc["devices"]] == [pci_name(1), pci_name(2), pci_name(3)]
    assert doc["devices"][0]["migration"] == ["STOP_COPY", "P2P", "PRE_COPY"]


def test_show(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--driver", driver.target, "show", pci_name(2))
    assert rc == 0
    assert "state:" in out and "RUNNING" in out and "0x7 (STOP_COPY|P2P|PRE_COPY)" in out
    doc = jrun(capsys, driver, "show", pci_name(2))
    assert doc["state"] == "RUNNING"
    assert doc["vhca_id"] == 2
    assert doc["mig_data_size"] > 0
    assert doc["dma_logging"] is True and doc["precopy_info_v2"] is True


def test_set_state(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    doc = jrun(capsys, driver, "set-state", pci_name(1), "stop")
    assert doc == {"device": pci_name(1), "from": "RUNNING", "to": "STOP", "data_fd": None}
    rc, out, _ = run(capsys, "--driver", driver.target, "set-state", pci_name(1), "PRE_COPY")
    assert rc == 0
    assert "RUNNING -> PRE_COPY" in out and "data fd: " in out


def test_save_then_load_gives_equal_digests(
    driver: Driver, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    img = tmp_path / "vf1.img"
    doc = jrun(capsys, driver, "save", pci_name(1), str(img))
    assert doc["bytes"] == img.stat().st_size > 0
    assert doc["state"] == "STOP" and doc["precopy"] == []
    rc, out, _ = run(capsys, "--driver", driver.target, "load", pci_name(2), str(img))
    assert rc == 0 and f"loaded {img.stat().st_size} bytes" in out
    src, dst, other = driver.digests(1, 2, 3)
    assert src == dst != other


def test_save_with_precopy_then_load_and_run(
    driver: Driver, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    img = tmp_path / "vf3.img"
    rc, out, _ = run(capsys, "--driver", driver.target, "save", pci_name(3), str(img), "--precopy")
    assert rc == 0
    assert "precopy 0: initial_bytes=" in out
    doc = jrun(capsys, driver, "load", pci_name(1), str(img), "--run")
    assert doc["state"] == "RUNNING"
    a, b = driver.digests(3, 1)
    assert a == b
    assert jrun(capsys, driver, "show", pci_name(1))["state"] == "RUNNING"


def test_precopy_info(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["precopy-info", pci_name(1), "--v2", "--iterations", "2", "--interval", "0.01"]
    doc = jrun(capsys, driver, *argv)
    assert doc["v2"] is True and doc["state"] == "RUNNING"
    assert len(doc["info"]) == 2 and doc["info"][0]["initial_bytes"] > 0
    rc, out, _ = run(capsys, "--driver", driver.target, "precopy-info", pci_name(1), "--v1")
    assert rc == 0 and out.count("initial_bytes=") == 3


def test_reset(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    doc = jrun(capsys, driver, "reset", pci_name(2))
    assert doc == {"device": pci_name(2), "reset": True, "state": "RUNNING"}


def test_migrate_gives_equal_digests(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    doc = jrun(
        capsys,
        driver,
        "migrate",
        pci_name(1),
        pci_name(3),
        "--dst-driver",
        driver.target,
        "--downtime-limit",
        "0.3",
        "--bandwidth",
        "100MiB",
    )
    assert doc["status"] == "completed" and doc["verified"]
    (dev,) = doc["devices"]
    assert dev["stop_copy_bytes"] + doc["precopy_bytes"] > 0
    a, b = driver.digests(1, 3)
    assert a == b == dev["source_digest"] == dev["destination_digest"]
    rc, out, _ = run(capsys, "--driver", driver.target, "migrate", pci_name(2), pci_name(1))
    assert rc == 0
    assert "migration completed" in out and "verified   digests equal" in out
    assert "REINIT     none seen" in out and "downtime" in out and "throughput" in out


@pytest.mark.parametrize("data_path", ["auto", "shm", "grpc"])
def test_migrate_data_path(
    driver: Driver, capsys: pytest.CaptureFixture[str], data_path: str
) -> None:
    """--data-path: user memory on one host (auto takes it), or gRPC; the
    report names it, and says it in its device line."""
    doc = jrun(capsys, driver, "migrate", pci_name(1), pci_name(2), "--data-path", data_path)
    assert doc["status"] == "completed" and doc["verified"]
    (dev,) = doc["devices"]
    assert dev["data_path"] == ("grpc" if data_path == "grpc" else "shm")
    rc, out, _ = run(
        capsys,
        "--driver",
        driver.target,
        "migrate",
        pci_name(2),
        pci_name(1),
        "--data-path",
        data_path,
    )
    assert rc == 0 and f"data path {dev['data_path']}" in out


def test_migrate_between_two_driver_services(capsys: pytest.CaptureFixture[str]) -> None:
    """Source and destination on separate vfio-driver processes (each with its
    own firmware): digests verified across the two firmwares."""
    a, b = Driver.start(vfs=2), Driver.start(vfs=2)
    try:
        assert a.digests(1) != b.digests(2)
        doc = jrun(capsys, a, "migrate", pci_name(1), pci_name(2), "--dst-driver", b.target)
        assert doc["status"] == "completed" and doc["verified"]
        assert a.digests(1) == b.digests(2)
    finally:
        a.stop()
        b.stop()


def test_migrate_verify_yes_without_a_scenario_service_fails_before_migrating(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plain = Driver.start(vfs=2, scenario=False)
    try:
        rc, out, err = run(capsys, "--driver", plain.target, "migrate", pci_name(1), pci_name(2),
                           "--verify", "yes")  # fmt: skip
        assert rc == 1 and "EOPNOTSUPP" in err and "--verify no" in err
        rc, out, err = run(capsys, "--driver", plain.target, "migrate", pci_name(1), pci_name(2))
        assert rc == 0 and "not verifying" in err and "verified   no" in out
    finally:
        plain.stop()


def test_scenario_subcommands(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    doc = jrun(capsys, driver, "scenario", "vfs")
    assert [v["vhca_id"] for v in doc["vfs"]] == [1, 2, 3]
    doc = jrun(capsys, driver, "scenario", "--firmware", driver.target, "digest", "1", pci_name(2))
    assert set(doc["digests"]) == {"1", pci_name(2)}
    doc = jrun(capsys, driver, "scenario", "reconfigure", pci_name(1), "--object", "QP:4096")
    assert doc["vhca_id"] == 1 and doc["trigger_id"] > 0
    doc = jrun(capsys, driver, "scenario", "fault", "2", "fail", "--opcode", "SAVE_VHCA_STATE")
    assert doc["fault_id"] > 0
    doc = jrun(capsys, driver, "scenario", "vfs", "--create", "1", "--size", "64KiB")
    assert len(doc["vfs"]) == 4


def test_injected_fault_fails_save(
    driver: Driver, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(capsys, "--driver", driver.target, "scenario", "fault", "1", "fail")[0] == 0
    img = tmp_path / "x.img"
    rc, _, err = run(capsys, "--driver", driver.target, "save", pci_name(1), str(img))
    assert rc == 1
    assert "EIO" in err and "Traceback" not in err
    assert not img.exists()  # no partial image


def test_unknown_device_is_enoent(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "--driver", driver.target, "show", "0000:99:00.0")
    assert rc == 1
    assert "ENOENT" in err and "vfioctl list" in err
    rc, out, _ = run(capsys, "--driver", driver.target, "--json", "reset", "nope")
    assert rc == 1
    assert json.loads(out)["error"]["name"] == "ENOENT"
    rc, _, err = run(capsys, "--driver", driver.target, "scenario", "digest", "0000:99:00.0")
    assert rc == 1 and "ENOENT" in err


def test_load_missing_file(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "--driver", driver.target, "load", pci_name(1), "/nonexistent/f.img")
    assert rc == 1 and "ENOENT" in err


def test_unreachable_driver(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "--driver", "127.0.0.1:1", "--timeout", "3", "list")
    assert rc == 1
    assert "ENOTCONN" in err and "is vfio-driver serve running at 127.0.0.1:1?" in err
    rc, out, err = run(capsys, "--json", "scenario", "--firmware", "127.0.0.1:1", "vfs")
    assert rc == 1
    assert json.loads(out)["error"]["name"] == "ECONNREFUSED"
    assert "fwemu serve" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["show"],
        ["set-state", "0000:81:00.1", "FLYING"],
        ["--timeout", "-1", "list"],
        ["precopy-info", "x", "--v1", "--v2"],
        ["scenario", "fault", "1", "explode"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert "usage:" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "Exit codes" in out
    rc, out, _ = run(capsys, "save", "--help")
    assert rc == 0 and "--precopy" in out


def test_as_a_process(driver: Driver) -> None:
    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return run_vfioctl(*argv, timeout=30)

    p = cli("--driver", driver.target, "--json", "list")
    assert p.returncode == 0 and len(json.loads(p.stdout)["devices"]) == 3
    p = cli("--driver", driver.target, "show", "nope")
    assert p.returncode == 1 and "ENOENT" in p.stderr and "Traceback" not in p.stderr
    p = cli("frobnicate")
    assert p.returncode == 2
