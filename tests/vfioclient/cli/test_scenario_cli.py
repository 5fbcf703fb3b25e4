"""`vfioctl scenario` and ScenarioClient for issue 13: reconfigure --mode,
configure (the automatic reconfigurations of a live VF), reset; against a
`vfio-driver serve --scenario-service` process (3 VFs of 256 KiB, no
workload: tests/support/vfioctl_driver.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from fwemu.link.ifc import KiB, ReconfigMode
from tests.support.vfioctl_driver import Driver
from vfioclient.cli import main
from vfioclient.scenario import ScenarioClient, ScenarioClientError

pytestmark = pytest.mark.grpc

SIZE = 256 * KiB


def run(capsys: pytest.CaptureFixture[str], driver: Driver, *argv: str) -> tuple[int, str, str]:
    rc = main(["--driver", driver.target, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def jrun(capsys: pytest.CaptureFixture[str], driver: Driver, *argv: str) -> Any:
    rc, out, err = run(capsys, driver, "--json", "scenario", *argv)
    assert rc == 0, err
    return json.loads(out)


def vf(capsys: pytest.CaptureFixture[str], driver: Driver, vhca_id: int) -> dict[str, Any]:
    (v,) = [v for v in jrun(capsys, driver, "vfs")["vfs"] if v["vhca_id"] == vhca_id]
    return v


def test_reconfigure_modes_configure_and_reset(
    driver: Driver, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = jrun(capsys, driver, "digest", "1")["digests"]["1"]
    doc = jrun(capsys, driver, "reconfigure", "1", "--object", "CQ:8KiB", "--mode", "replace")
    assert doc["mode"] == "replace" and doc["trigger_id"] > 0
    assert vf(capsys, driver, 1)["state_size"] == SIZE
    objects = vf(capsys, driver, 1)["num_objects"]
    jrun(capsys, driver, "reconfigure", "1", "--object", "QP:1", "--mode", "remove")
    assert vf(capsys, driver, 1)["num_objects"] == objects - 1
    jrun(capsys, driver, "reconfigure", "1", "--object", "QP:4KiB")  # add, the default
    assert vf(capsys, driver, 1)["state_size"] == SIZE + 4 * KiB

    doc = jrun(
        capsys, driver, "configure", "2", "--reconfig-rate", "50", "--reconfig-mode", "add",
        "--reconfig-bytes", "4KiB",
    )  # fmt: skip
    config = doc["vf"]["config"]
    assert (config["reconfig_rate_per_s"], config["reconfig_mode"]) == (50.0, ReconfigMode.ADD)
    assert config["reconfig_bytes"] == 4 * KiB

    rc, out, err = run(capsys, driver, "scenario", "reset", "1")
    assert rc == 0, err
    assert f"vhca 1: reset to its seed: size {SIZE}" in out
    assert jrun(capsys, driver, "digest", "1")["digests"]["1"] == fresh
    doc = jrun(capsys, driver, "reset", "2")
    assert doc["vf"]["state_size"] == SIZE and doc["vf"]["config"]["reconfig_rate_per_s"] == 50.0


@pytest.mark.parametrize(
    "argv",
    [
        ["reconfigure", "1", "--mode", "swap"],
        ["configure", "1", "--reconfig-rate", "-1"],
        ["configure", "1", "--reconfig-rate", "nan"],
        ["configure", "1", "--reconfig-rate", "1001"],
        ["configure", "1", "--reconfig-mode", "shuffle"],
        ["reset"],
    ],
)
def test_bad_modes_and_rates_are_usage_errors(
    driver: Driver, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    rc, _, err = run(capsys, driver, "scenario", *argv)
    assert rc == 2 and "usage:" in err


def test_configure_without_a_change_is_einval(
    driver: Driver, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, driver, "--json", "scenario", "configure", "1")
    assert rc == 1 and json.loads(out)["error"]["name"] == "EINVAL"


def test_scenario_client_modes_by_name_configure_and_reset(driver: Driver) -> None:
    async def go() -> None:
        async with await ScenarioClient.connect(driver.target) as s:
            fresh = await s.digest(3)
            await s.reconfigure(3, [("QP", 8 * KiB)], mode="Replace")
            await s.reconfigure(3, mode=ReconfigMode.REMOVE)
            info = await s.get_vf(3)
            assert (info.state_size, info.reconfigurations) == (SIZE, 2)
            with pytest.raises(ValueError, match="mode"):
                await s.reconfigure(3, mode="shuffle")
            info = await s.configure_vf(3, reconfig_rate_per_s=2.5)
            assert info.config.reconfig_rate_per_s == 2.5
            with pytest.raises(ScenarioClientError, match="reconfig_rate_per_s"):
                await s.configure_vf(3, reconfig_rate_per_s=float("inf"))
            assert (await s.reset_vf(3)).state_size == SIZE
            assert await s.digest(3) == fresh
            [made] = await s.create_vfs(1)
            await s.remove_vf(made.vhca_id)
            assert [v.vhca_id for v in await s.list_vfs()] == [1, 2, 3]

    asyncio.run(go())
