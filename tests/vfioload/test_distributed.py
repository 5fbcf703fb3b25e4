"""vfio-loadtest as CI runs it: one Locust master and two workers, processes
on 127.0.0.1, 20 s of every user class against a `vfio-driver serve
--scenario-service` process.  The CSV shows requests of each user class,
no failure (no missed or spurious REINIT, no wrong errno, no digest
mismatch), REINITs detected, and the run leaves no VF behind."""

from __future__ import annotations

import csv
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.vfioctl_driver import Driver
from vfioclient.sync import SyncVfioClient
from vfioload.mix import CLASS_NAMES

pytestmark = pytest.mark.grpc

LOADTEST = [sys.executable, "-m", "vfioload.cli"]
RUN_S = 20
BOUND_S = RUN_S + 60


@pytest.fixture(name="driver")
def driver_fixture() -> Iterator[Driver]:
    d = Driver.start(vfs=0)
    yield d
    d.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stats(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if row["Type"]]


def test_a_distributed_run_of_every_user_class_has_no_failure(
    driver: Driver, tmp_path: Path
) -> None:
    port = str(free_port())
    ours = ["--driver", driver.target, "--mix", ",".join(f"{k}:1" for k in CLASS_NAMES)]
    workers = [
        subprocess.Popen(
            [*LOADTEST, *ours, "--worker", "--master-host", "127.0.0.1", "--master-port", port],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        master = subprocess.run(
            [*LOADTEST, *ours, "--master", "--master-bind-host", "127.0.0.1",
             "--master-bind-port", port, "--expect-workers", "2", "--headless",
             "-u", "8", "-r", "8", "-t", f"{RUN_S}s", "--csv", str(tmp_path / "run"),
             "--only-summary"],
            capture_output=True, text=True, timeout=BOUND_S,
        )  # fmt: skip
        for w in workers:
            w.wait(timeout=30)
    finally:
        for w in workers:
            w.kill()
            w.communicate()
    rows = stats(tmp_path / "run_stats.csv")
    report = master.stderr[-4000:]
    assert master.returncode == 0, report
    by_kind: dict[str, int] = {}
    for row in rows:
        by_kind[row["Type"]] = by_kind.get(row["Type"], 0) + int(row["Request Count"])
        assert row["Failure Count"] == "0", (row["Type"], row["Name"], report)
    assert set(by_kind) == set(CLASS_NAMES), by_kind
    assert all(n > 0 for n in by_kind.values()), by_kind
    names = {(r["Type"], r["Name"]): int(r["Request Count"]) for r in rows}
    assert names[("reinit-loop", "REINIT detection")] > 0
    assert names[("migration", "migration")] > 0
    assert ("reinit-loop", "missed REINIT") not in names
    with SyncVfioClient.connect(driver.target) as c:
        assert c.list_devices() == [], "the run left VFs behind"
