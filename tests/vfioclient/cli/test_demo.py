"""The README's main job: `vfioctl demo` migrates a VF with a live workload,
a reconfiguration during precopy makes the driver report REINIT, the
orchestrator re-arms its switchover-ack, and the digests are equal."""

from __future__ import annotations

import json

import pytest

from tests.support.vfioctl_driver import Driver
from vfioclient.cli.demo import main


@pytest.mark.parametrize(("data_path", "used"), [("auto", "shm"), ("grpc", "grpc")])
def test_embedded_demo_sees_a_reinit_and_digests_are_equal(
    capsys: pytest.CaptureFixture[str], data_path: str, used: str
) -> None:
    args = ["--size", "4MiB", "--dirty-rate", "2MiB", "--data-path", data_path, "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["equal"] and out["source_digest"] == out["destination_digest"]
    assert out["reconfigured"]
    assert out["report"]["status"] == "completed"
    assert [e["handling"] for e in out["report"]["reinits"]] == ["ack re-armed"]
    assert out["report"]["devices"][0]["data_path"] == used


def test_demo_refuses_a_vf_that_can_never_switch_over(capsys: pytest.CaptureFixture[str]):
    """mlx5vf's MIG_DATA_SIZE is the whole state: above bandwidth x downtime a
    QEMU-like switchover never comes, so the demo says so instead of hanging."""
    assert main(["--size", "64MiB", "--bandwidth", "1MiB"]) == 2
    assert "never fits the downtime limit" in capsys.readouterr().err


def test_demo_between_two_driver_services(capsys: pytest.CaptureFixture[str]) -> None:
    """--dst-driver: source and destination on two hosts, each with its own
    firmware; each side's firmware gives its digest."""
    a, b = Driver.start(vfs=1, dirty_rate="1MiB"), Driver.start(vfs=1)
    try:
        before = b.digests(1)
        assert main(["--driver", a.target, "--dst-driver", b.target, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["equal"] and out["reconfigured"]
        assert out["report"]["verified"] and len(out["report"]["reinits"]) == 1
        assert b.digests(1) == [out["destination_digest"]] != before
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize(
    "argv", [["--dst-driver", "127.0.0.1:1"], ["--driver", "x:1", "--dst-scenario", "y:1"]]
)
def test_demo_destination_flags_need_running_services(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "need" in capsys.readouterr().err
