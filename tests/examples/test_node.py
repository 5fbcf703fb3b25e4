"""examples/node/migrate.js, a client written from the proto files alone,
against a `vfio-driver serve --scenario-service` process: a migration through
a REINIT with equal digests, errnos decoded from the status trailer with no
fd left open (after a failure, a SIGTERM, or a SIGKILL through the Session
stream), the README's command, and full marks from `vfioctl exam`."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from driver.shards import pci_name
from tests.examples import (
    ROOT,
    Ran,
    child_env,
    driver_view,
    inject_fault,
    node_command,
    readme_commands,
    reconfigure_on_first_save,
    run,
)
from tests.support.vfioctl_driver import Driver

pytestmark = pytest.mark.grpc

SRC, DST, OTHER = pci_name(1), pci_name(2), pci_name(3)


@pytest.fixture(name="driver")
def driver_fixture() -> Iterator[Driver]:
    """Three 256 KiB VFs without a workload: their digests stay as the
    migration left them, so they can be compared again afterwards."""
    d = Driver.start(vfs=3)
    try:
        yield d
    finally:
        d.stop()


def test_a_migration_through_a_reinit_completes_with_equal_digests(driver: Driver) -> None:
    node = node_command()
    reconfigure_on_first_save(driver.target, 1)
    ran = run([*node, "--driver", driver.target, "--json", SRC, DST])
    assert ran.code == 0, ran.stderr
    doc = ran.doc()
    assert doc["result"] == "completed"
    assert doc["precopy_info_v2"] is True
    assert doc["reinits"] >= 1, ran.stderr
    assert "REINIT (first PRECOPY_INFO)" in ran.stderr
    assert doc["digests_equal"] is True
    assert doc["source_digest"] and doc["source_digest"] == doc["destination_digest"]
    assert doc["stop_copy_bytes"] > 0 and doc["precopy_bytes"] > 0
    assert doc["errno"] is None
    assert doc["client"].startswith("node-")
    # The firmware agrees, asked again after the client has gone.
    assert driver.digests(1, 2) == [doc["source_digest"]] * 2
    view = driver_view(driver.target)
    assert view.open_counts == {SRC: 0, DST: 0, OTHER: 0}
    assert view.findings == []


def test_a_device_that_does_not_exist_is_enoent_and_no_fd_stays_open(driver: Driver) -> None:
    node = node_command()
    ran = run([*node, "--driver", driver.target, "--json", SRC, "0000:81:00.7"])
    assert ran.code == 1
    doc = ran.doc()
    assert (doc["result"], doc["errno_name"], doc["errno"]) == ("failed", "ENOENT", 2)
    assert "OpenDevice" in doc["error"]
    # Without --json the errno is printed for a person.
    ran = run([*node, "--driver", driver.target, SRC, "0000:81:00.7"])
    assert ran.code == 1 and ran.stdout == ""
    assert "failed [ENOENT 2]: OpenDevice: ENOENT (errno 2)" in ran.stderr
    view = driver_view(driver.target)
    assert view.open_counts == {SRC: 0, DST: 0, OTHER: 0}  # the source fd was closed


def test_a_refused_load_fails_with_its_errno_and_leaves_nothing_open(driver: Driver) -> None:
    """The destination's LOAD fails: EIO from the status trailer, exit 1, the
    abort (source RUNNING, destination reset after its data fd was closed)
    leaves no audit finding and no fd."""
    node = node_command()
    inject_fault(driver.target, 2, "fail", opcode="LOAD_VHCA_STATE", count=4)
    ran = run([*node, "--driver", driver.target, "--json", SRC, DST])
    assert ran.code == 1, ran.stderr
    doc = ran.doc()
    assert (doc["result"], doc["errno_name"], doc["errno"]) == ("failed", "EIO", 5)
    assert "LOAD_VHCA_STATE" in doc["error"]
    assert "abort: source -> RUNNING" in ran.stderr
    assert "abort: destination reset" in ran.stderr
    view = driver_view(driver.target)
    assert view.open_counts == {SRC: 0, DST: 0, OTHER: 0}
    assert view.findings == []


def _started_precopy(driver: Driver, node: list[str]) -> subprocess.Popen[str]:
    """migrate.js paused after its first precopy round (a long --interval-ms),
    both devices and two data fds open."""
    proc = subprocess.Popen(
        [*node, "--driver", driver.target, "--interval-ms", "60000", "--json", SRC, DST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "source: -> PRE_COPY" in line:
            break
    else:
        proc.wait()
        pytest.fail("migrate.js never reached PRE_COPY: " + "".join(seen))
    time.sleep(0.3)  # into the pause after the first round
    assert driver_view(driver.target).open_counts == {SRC: 1, DST: 1, OTHER: 0}
    return proc


def test_sigterm_aborts_and_closes_every_fd(driver: Driver) -> None:
    proc = _started_precopy(driver, node_command())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    doc = Ran(1, out, err).doc()
    assert (doc["result"], doc["error"]) == ("failed", "interrupted")
    assert "SIGTERM: aborting" in err and "abort: destination reset" in err
    view = driver_view(driver.target)
    assert view.open_counts == {SRC: 0, DST: 0, OTHER: 0}
    assert view.findings == []


def test_a_killed_client_s_fds_close_with_its_session(driver: Driver) -> None:
    proc = _started_precopy(driver, node_command())
    proc.kill()  # no CloseFd: the Session stream's end closes them
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while (counts := driver_view(driver.target).open_counts) != {SRC: 0, DST: 0, OTHER: 0}:
        assert time.monotonic() < deadline, counts
        time.sleep(0.05)


def test_the_same_device_twice_and_bad_options_are_usage_errors(driver: Driver) -> None:
    node = node_command()
    for argv in ([SRC, SRC], [SRC], ["--max-rounds", "0", SRC, DST], ["--frobnicate", SRC, DST]):
        ran = run([*node, "--driver", driver.target, *argv])
        assert ran.code == 2, argv
        assert "usage:" in ran.stderr
    assert driver_view(driver.target).open_counts == {SRC: 0, DST: 0, OTHER: 0}


def test_the_readmes_node_command_migrates(driver: Driver) -> None:
    node = node_command()
    (line,) = readme_commands("examples/node/migrate.js")
    argv = shlex.split(line.replace("127.0.0.1:50052", driver.target))
    assert argv[:2] == ["node", "examples/node/migrate.js"]
    ran = run([*node, *argv[2:]])
    assert ran.code == 0, ran.stderr
    assert ran.stdout.startswith(f"migrated {SRC} -> {DST}:")
    digest = driver.digests(1)[0]
    assert f"source digest      {digest}" in ran.stdout
    assert f"destination digest {digest}" in ran.stdout


def test_vfioctl_exam_gives_the_node_client_every_trap() -> None:
    node = node_command()
    d = Driver.start(vfs=0)
    try:
        orchestrator = shlex.join([*node, "--driver", d.target])
        ran = run(
            [
                sys.executable, "-m", "vfioclient.cli", "--driver", d.target, "--json",
                "--timeout", "300", "exam", "--scenario", d.target,
                "--run", orchestrator + " {source} {destination}",
            ],
            timeout=310,
        )  # fmt: skip
    finally:
        d.stop()
    doc = ran.doc()
    verdicts = {t["trap"]: (t["passed"], t["outcome"], t["reasons"]) for t in doc["traps"]}
    assert ran.code == 0 and doc["all_passed"], verdicts
    assert doc["passed"] == 8 and doc["failed"] == 0
    # Each trap's moment came (the runner runs one again on a fresh pair when
    # it did not): a client that skips the final PRECOPY_INFO after the
    # switchover decision never sees the REINIT of reinit-after-switchover-decision.
    assert all(t["fired"] for t in doc["traps"]), verdicts
    outcomes = {t["trap"]: t["outcome"] for t in doc["traps"]}
    # tracking-lost may complete (the stream stayed whole) or abort (a read failed).
    assert outcomes.pop("tracking-lost") in ("completed", "aborted")
    assert outcomes == {
        "reinit-after-ack": "completed",
        "reinit-after-switchover-decision": "completed",  # a late REINIT re-arms the ack
        "reinit-first-precopy-info": "completed",
        "save-fails-in-stop-copy": "aborted",
        "completion-delayed": "completed",
        "load-refused": "aborted",
        "not-migratable": "refused",
    }
