"""What vfioctl tells a person (issue 18), through the CLI as a process: the
--firmware hint of a migration it cannot verify, a server without the
Scenario service named as such (not as unreachable), `migrate SRC SRC`
refused up front, and the `list` table aligned whatever its cells' widths."""

from __future__ import annotations

import asyncio
import errno
import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driver.shards import pci_name
from grpcsvc.spawn import DRIVER, FWEMU
from tests.support import tls_mode
from tests.support.vfioctl_driver import Driver, run_vfioctl
from vfioclient.calls import Device
from vfioclient.cli.devices import cmd_list
from vfioclient.cli.output import Out, table
from vfioclient.scenario import ScenarioClient, ScenarioClientError

pytestmark = pytest.mark.grpc

DEV, DEV2 = pci_name(1), pci_name(2)


def vfioctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return run_vfioctl(*argv)


def json_of(p: subprocess.CompletedProcess[str]) -> Any:
    assert "Traceback" not in p.stderr, p.stderr
    return json.loads(p.stdout)


@pytest.fixture(name="over_fwemu")
def over_fwemu_fixture() -> Iterator[tuple[str, str]]:
    """`fwemu serve` and a `vfio-driver serve --firmware` over it: (driver, fwemu)."""
    fw_args = ["--vfs", "2", "--size", "256KiB", "--dirty-rate", "0", "--log-level", "error"]
    with tls_mode.served(FWEMU, *fw_args) as (_, fw):
        link = tls_mode.firmware_link_args()
        with tls_mode.served(DRIVER, "--firmware", fw, *link, "--log-level", "error") as (_, drv):
            yield drv, fw


def test_an_unverified_migration_over_fwemu_hints_at_firmware(
    over_fwemu: tuple[str, str],
) -> None:
    """The driver's port has no Scenario service: the note says so, and
    names --firmware (and --dst-firmware); with --firmware it verifies."""
    driver, fw = over_fwemu
    p = vfioctl("--driver", driver, "migrate", DEV, DEV2)
    assert p.returncode == 0, p.stderr
    assert "verified   no" in p.stdout
    notes = p.stderr
    assert f"vfioctl: not verifying: the service at {driver} does not serve" in notes
    assert "give --firmware HOST:PORT, the fwemu's address" in notes
    assert "--dst-firmware HOST:PORT for the destination's" in notes
    doc = json_of(vfioctl("--driver", driver, "--json", "migrate", DEV2, DEV, "--firmware", fw))
    assert doc["status"] == "completed" and doc["verified"] is True
    # --verify yes: the error's hint names --firmware too.
    p = vfioctl("--driver", driver, "migrate", DEV, DEV2, "--verify", "yes")
    assert p.returncode == 1 and "--firmware HOST:PORT (the fwemu's Scenario service" in p.stderr


@pytest.fixture(name="plain_driver")
def plain_driver_fixture() -> Iterator[Driver]:
    """A driver without --scenario-service: a gRPC server that answers, but
    not for the Scenario service."""
    d = Driver.start(vfs=2, scenario=False)
    try:
        yield d
    finally:
        d.stop()


def test_a_server_without_the_scenario_service_is_eopnotsupp(plain_driver: Driver) -> None:
    t = plain_driver.target
    p = vfioctl("--json", "scenario", "--firmware", t, "vfs")
    assert p.returncode == 1
    error = json_of(p)["error"]
    assert error["name"] == "EOPNOTSUPP", error
    assert error["message"].startswith(f"the service at {t} does not serve the firmware's")
    assert "fwemu.api.v1.Scenario" in error["message"]
    assert "--scenario-service" in error["hint"] and "ECONNREFUSED" not in p.stderr
    # Nobody at all on a port stays ECONNREFUSED.
    p = vfioctl("--json", "--timeout", "3", "scenario", "--firmware", "127.0.0.1:1", "vfs")
    assert json_of(p)["error"]["name"] == "ECONNREFUSED"

    async def connect() -> None:
        await ScenarioClient.connect(t, timeout=5)

    with pytest.raises(ScenarioClientError) as e:
        asyncio.run(connect())
    assert e.value.errno == errno.EOPNOTSUPP


def test_migrating_a_device_to_itself_is_refused_up_front(plain_driver: Driver) -> None:
    t = plain_driver.target
    for extra in ([], ["--dst-driver", t]):
        p = vfioctl("--driver", t, "migrate", DEV, DEV, *extra)
        assert p.returncode == 1 and p.stdout == ""  # no report: nothing was tried
        assert f"EINVAL: SRC and DST are the same device ({DEV} on {t})" in p.stderr
        assert "--dst-driver" in p.stderr and "Traceback" not in p.stderr
    p = vfioctl("--driver", t, "--json", "migrate", DEV, DEV)
    assert json_of(p)["error"]["name"] == "EINVAL"
    # The device was not touched: still RUNNING, never opened for a migration.
    assert json_of(vfioctl("--driver", t, "--json", "show", DEV))["state"] == "RUNNING"
    assert json_of(vfioctl("--driver", t, "--json", "audit", DEV))["findings"] == []


def assert_aligned(lines: list[str], right: set[int]) -> None:
    """Every line's cells start (left columns) or end (right columns) where
    the header's do; `right`: the indexes of right-aligned columns."""
    spans = [[(m.start(), m.end()) for m in re.finditer(r"\S+", ln)] for ln in lines]
    n = len(spans[0])
    assert all(len(s) == n for s in spans), lines
    for col in range(n):
        edge = 1 if col in right else 0
        assert len({s[col][edge] for s in spans}) == 1, (col, lines)


cell = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            st.lists(cell, min_size=n, max_size=n),
            st.lists(st.lists(cell, min_size=n, max_size=n), max_size=6),
            st.sets(st.integers(0, n - 1)),
        )
    )
)
def test_a_table_is_aligned_for_any_widths(
    case: tuple[list[str], list[list[str]], set[int]],
) -> None:
    header, rows, right = case
    header = [f"{h}{i}" for i, h in enumerate(header)]  # distinct names
    lines = table(header, rows, right=" ".join(header[i] for i in right))
    assert len(lines) == len(rows) + 1
    assert_aligned(lines, right)


def test_the_list_table_is_aligned_for_long_cells(capsys: pytest.CaptureFixture[str]) -> None:
    class Client:
        async def list_devices(self) -> list[Device]:
            return [
                Device("0000:81:00.1", 1, 1, True, 7, 0, "mlx5-vfio-pci"),
                Device("000a:81:1f.7-long", 123456, 255, False, 0, 1234, "vfio-pci"),
                Device("d", 2, 2, True, 1, 0, "a-much-longer-driver-name"),
            ]

    asyncio.run(cmd_list(Client(), None, Out(False)))  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["DEVICE", "VHCA", "FN", "OPEN", "DRIVER", "MIGRATION"]
    assert_aligned(lines, right={1, 2, 3})


def test_the_list_table_is_aligned(plain_driver: Driver) -> None:
    p = vfioctl("--driver", plain_driver.target, "list")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3 and "mlx5-vfio-pci" in lines[1]
    assert_aligned(lines, right={1, 2, 3})
