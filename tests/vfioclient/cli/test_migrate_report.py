"""`vfioctl migrate`'s report, the command run as a process (issue 18):

* item 1: after `vfioctl scenario reconfigure VF --after-saved-bytes N` (N
  under the VF's size: the reconfiguration runs inside the first SAVE of its
  migration), the report lists the REINIT of the first PRECOPY_INFO, as many
  REINITs as the driver answered (its Events stream, followed meanwhile);
* item 8: a downtime over --downtime-limit is flagged, with both numbers, in
  the text and in --json (`downtime_exceeded`, `downtime_limit_s`)."""

from __future__ import annotations

import asyncio
import json
import re
import sys

import pytest

from driver.api.events import PrecopyAnswered, StateChanged
from driver.shards import pci_name
from tests.support.vfioctl_driver import Driver
from vfioclient import VfioClient

pytestmark = pytest.mark.grpc

VFIOCTL = [sys.executable, "-m", "vfioclient.cli"]
BOUND = 60


async def vfioctl(driver: Driver, *argv: str) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        *VFIOCTL,
        "--driver",
        driver.target,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(p.communicate(), BOUND)
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


async def migrate_watched(driver: Driver, src: str, dst: str, *more: str) -> tuple[dict, int]:  # type: ignore[type-arg]
    """`vfioctl --json migrate SRC DST ...`: its report, and the REINITs the
    driver answered for SRC meanwhile (its Events stream, to the cleanup)."""
    async with await VfioClient.connect(driver.target) as c:
        stream = c.events(src)
        await stream.ready()
        rc, out, err = await vfioctl(driver, "--json", "migrate", src, dst, *more)
        assert rc == 0, err
        reinits = 0
        async with asyncio.timeout(BOUND):
            async for ev in stream:
                if isinstance(ev.payload, PrecopyAnswered) and ev.payload.reinit:
                    reinits += 1
                if isinstance(ev.payload, StateChanged) and ev.payload.from_state == "STOP_COPY":
                    break
        await stream.aclose()
    report: dict = json.loads(out)  # type: ignore[type-arg]
    return report, reinits


async def test_a_reinit_at_setup_is_in_the_report(driver: Driver) -> None:
    """The issue's steps: reconfigure after fewer saved bytes than the VF
    holds, migrate: the report says REINIT (setup), as often as the driver."""
    rc, _, err = await vfioctl(
        driver, "scenario", "reconfigure", "3", "--after-saved-bytes", "4KiB"
    )
    assert rc == 0, err
    report, answered = await migrate_watched(driver, pci_name(3), pci_name(2))
    assert report["status"] == "completed" and report["verified"]
    assert answered == len(report["reinits"]) == 1
    (e,) = report["reinits"]
    assert (e["device"], e["phase"], e["iteration"]) == (pci_name(3), "setup", 0)
    assert e["handling"] == "the first ack waits for them" and e["initial_bytes"] > 0
    # The text says it too.
    rc, _, err = await vfioctl(
        driver, "scenario", "reconfigure", "1", "--after-saved-bytes", "4KiB"
    )
    assert rc == 0, err
    rc, out, err = await vfioctl(driver, "migrate", pci_name(1), pci_name(2))
    assert rc == 0, err
    assert "REINIT     none seen" not in out
    assert re.search(rf"REINIT     {re.escape(pci_name(1))} at .*\(setup\)", out), out


async def test_a_migration_without_reinit_says_none_seen(driver: Driver) -> None:
    report, answered = await migrate_watched(driver, pci_name(1), pci_name(2))
    assert report["status"] == "completed" and report["reinits"] == [] and answered == 0


async def test_a_downtime_over_the_limit_is_flagged_in_text_and_json(driver: Driver) -> None:
    # 1 ms: the VF (256 KiB) fits bandwidth x limit (1 MiB), but no stop-copy
    # over gRPC (a dozen calls, the load, the destination started) is that quick.
    rc, out, err = await vfioctl(
        driver, "--json", "migrate", pci_name(1), pci_name(2), "--downtime-limit", "0.001"
    )
    assert rc == 0, err
    r = json.loads(out)
    assert r["status"] == "completed" and r["downtime_limit_s"] == 0.001
    assert r["downtime_s"] > 0.001 and r["downtime_exceeded"] is True

    rc, out, err = await vfioctl(
        driver, "migrate", pci_name(2), pci_name(3), "--downtime-limit", "0.001"
    )
    assert rc == 0, err
    m = re.search(r"WARNING    downtime ([\d.]+) ms exceeded the limit of 1\.0 ms", out)
    assert m is not None and float(m.group(1)) > 1.0, out
    downtime = re.search(r"time       downtime ([\d.]+) ms", out)
    assert downtime is not None and downtime.group(1) == m.group(1)


async def test_a_downtime_within_the_limit_has_no_warning(driver: Driver) -> None:
    rc, out, err = await vfioctl(
        driver, "--json", "migrate", pci_name(1), pci_name(2), "--downtime-limit", "30"
    )
    assert rc == 0, err
    r = json.loads(out)
    assert r["downtime_limit_s"] == 30 and r["downtime_s"] < 30
    assert r["downtime_exceeded"] is False
    rc, out, err = await vfioctl(
        driver, "migrate", pci_name(2), pci_name(3), "--downtime-limit", "30"
    )
    assert rc == 0 and "WARNING" not in out, (out, err)
