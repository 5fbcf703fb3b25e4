"""examples/grpcurl/migrate.sh, the migration as grpcurl and jq calls from the
proto files, against a `vfio-driver serve --scenario-service` process: through
a REINIT with equal digests, errnos decoded with every fd closed (the EXIT
trap's abort after a refused LOAD), and the README's command."""

from __future__ import annotations

import shlex
from collections.abc import Iterator

import pytest

from driver.shards import pci_name
from tests.examples import (
    driver_view,
    grpcurl_command,
    inject_fault,
    readme_commands,
    reconfigure_on_first_save,
    run,
)
from tests.support.vfioctl_driver import Driver

pytestmark = pytest.mark.grpc

SRC, DST = pci_name(1), pci_name(2)


@pytest.fixture(name="driver")
def driver_fixture() -> Iterator[Driver]:
    """Two 256 KiB VFs without a workload (digests stay as migrated)."""
    d = Driver.start(vfs=2)
    try:
        yield d
    finally:
        d.stop()


def test_a_migration_through_a_reinit_completes_with_equal_digests(driver: Driver) -> None:
    script = grpcurl_command()
    reconfigure_on_first_save(driver.target, 1)
    ran = run([*script, "--driver", driver.target, "--json", SRC, DST])
    assert ran.code == 0, ran.stderr
    doc = ran.doc()
    assert doc["result"] == "completed"
    assert doc["reinits"] >= 1, ran.stderr
    assert "REINIT (first PRECOPY_INFO)" in ran.stderr
    assert doc["digests_equal"] is True
    assert doc["source_digest"] and doc["source_digest"] == doc["destination_digest"]
    assert doc["client"].startswith("grpcurl-")
    assert driver.digests(1, 2) == [doc["source_digest"]] * 2
    view = driver_view(driver.target)
    assert view.open_counts == {SRC: 0, DST: 0}  # the EXIT trap closed every fd
    assert view.findings == []


def test_a_device_that_does_not_exist_is_enoent_and_no_fd_stays_open(driver: Driver) -> None:
    script = grpcurl_command()
    ran = run([*script, "--driver", driver.target, SRC, "0000:81:00.7"])
    assert ran.code == 1
    assert "failed [ENOENT 2]: OpenDevice: ENOENT (errno 2)" in ran.stderr
    assert driver_view(driver.target).open_counts == {SRC: 0, DST: 0}


def test_a_refused_load_aborts_with_its_errno_and_leaves_nothing_open(driver: Driver) -> None:
    script = grpcurl_command()
    inject_fault(driver.target, 2, "fail", opcode="LOAD_VHCA_STATE", count=4)
    ran = run([*script, "--driver", driver.target, "--json", SRC, DST])
    assert ran.code == 1, ran.stderr
    doc = ran.doc()
    assert (doc["result"], doc["errno_name"], doc["errno"]) == ("failed", "EIO", 5)
    assert "LOAD_VHCA_STATE" in doc["error"]
    assert "abort: source -> RUNNING" in ran.stderr
    assert "abort: destination reset" in ran.stderr
    view = driver_view(driver.target)
    assert view.open_counts == {SRC: 0, DST: 0}
    assert view.findings == []


def test_the_readmes_grpcurl_command_migrates(driver: Driver) -> None:
    grpcurl_command()
    (line,) = readme_commands("examples/grpcurl/migrate.sh")
    ran = run(["bash", "-c", line.replace("127.0.0.1:50052", driver.target)])
    assert ran.code == 0, ran.stderr
    assert ran.stdout.startswith(f"migrated {SRC} -> {DST}:")
    digest = driver.digests(1)[0]
    assert f"destination digest {digest}" in ran.stdout
    assert shlex.split(line)[-2:] == [SRC, DST]
