"""`vfioctl save` and `vfioctl load` as processes (issue 18, items 2 and 7):
each closes its data fd right after the state change that ended the stream
(QEMU's vfio_save_cleanup / vfio_load_cleanup), before `load --run` goes on
to RUNNING, so the driver's audit finds nothing (`vfioctl events` shows no
audit event, `vfioctl audit` no finding); and they say what becomes of a
device left STOP: vfioctl's exit closes it, the last close resets it, and the
next open shows RUNNING."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from driver.shards import pci_name
from tests.support.vfioctl_driver import Driver, run_vfioctl
from tests.vfioclient.cli.test_events_audit import Follower

pytestmark = pytest.mark.grpc

BOUND = 60


def vfioctl(driver: Driver, *argv: str) -> subprocess.CompletedProcess[str]:
    return run_vfioctl("--driver", driver.target, *argv, timeout=BOUND)


def doc(driver: Driver, *argv: str) -> dict:  # type: ignore[type-arg]
    p = vfioctl(driver, "--json", *argv)
    assert p.returncode == 0, p.stderr
    found: dict = json.loads(p.stdout)  # type: ignore[type-arg]
    return found


@pytest.fixture(name="events")
def events_fixture(driver: Driver) -> Iterator[Follower]:
    f = Follower("--driver", driver.target, "events", "--json")
    try:
        yield f
    finally:
        f.kill()


def until_change(device: str, change: tuple[str, str]) -> Callable[[str], bool]:
    def done(line: str) -> bool:
        e = json.loads(line)
        return e["device"] == device and (e.get("from_state"), e.get("to_state")) == change

    return done


@pytest.mark.parametrize("run", [True, False], ids=["--run", "no --run"])
def test_save_then_load_leave_no_stream_open(
    driver: Driver, events: Follower, tmp_path: Path, run: bool
) -> None:
    image = str(tmp_path / "vf1.img")
    saved = doc(driver, "save", pci_name(1), image)
    loaded = doc(driver, "load", pci_name(2), image, *(["--run"] if run else []))
    assert loaded["bytes"] == saved["bytes"] > 0
    # Everything up to the load's last state change (a finding for a data fd
    # left open comes with the state change request, before it).
    last = ("RUNNING_P2P", "RUNNING") if run else ("RESUMING", "STOP")
    lines = events.until(until_change(pci_name(2), last))
    kinds = [json.loads(line)["kind"] for line in lines]
    assert "audit" not in kinds and kinds.count("state_change") >= 4
    for device in (pci_name(1), pci_name(2)):
        report = doc(driver, "audit", device)
        assert report["findings"] == [] and report["counts"] == {}, report
    text = vfioctl(driver, "audit")
    assert text.returncode == 0 and "no findings" in text.stdout


def test_a_device_left_stop_is_running_at_the_next_open_as_save_and_load_say(
    driver: Driver, tmp_path: Path
) -> None:
    image = str(tmp_path / "vf1.img")
    p = vfioctl(driver, "save", pci_name(1), image)
    assert p.returncode == 0, p.stderr
    assert "device left STOP" not in p.stdout
    assert "device STOP until vfioctl exits" in p.stdout
    assert "the next open finds it RUNNING" in p.stdout
    saved = doc(driver, "save", pci_name(1), image)
    assert (saved["state"], saved["state_after_close"]) == ("STOP", "RUNNING")
    assert doc(driver, "show", pci_name(1))["state"] == saved["state_after_close"]

    p = vfioctl(driver, "load", pci_name(2), image)
    assert p.returncode == 0, p.stderr
    assert "device STOP until vfioctl exits" in p.stdout
    loaded = doc(driver, "load", pci_name(2), image)
    assert (loaded["state"], loaded["state_after_close"]) == ("STOP", "RUNNING")
    assert doc(driver, "show", pci_name(2))["state"] == loaded["state_after_close"]
    # The VFs have no workload: the loaded state is the saved one.
    assert driver.digests(1) == driver.digests(2)
