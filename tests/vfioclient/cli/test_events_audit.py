"""vfioctl events and vfioctl audit against a `vfio-driver serve` process,
and the sync client's events/audit.

`vfioctl events` runs as a process of its own (it follows until Ctrl-C or
the end of the stream, exit 0 both ways): the test waits for its
"following" note on stderr, then makes events happen with vfioctl commands
and the sync client."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

import pytest

from driver.api.events import StateChanged
from driver.audit import RESET_WITH_OPEN_STREAM, RULES
from driver.shards import pci_name
from driver.vfio.uapi import MigState
from tests.support.vfioctl_driver import Driver
from vfioclient.cli import main
from vfioclient.sync import SyncVfioClient

pytestmark = pytest.mark.grpc

TIMEOUT = 15.0


class Follower:
    """A `vfioctl events` process; its stdout lines arrive on a queue."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vfioclient.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: queue.Queue[str | None] = queue.Queue()
        for stream, q in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors)):
            threading.Thread(target=_pump, args=(stream, q), daemon=True).start()
        note = self.errors.get(timeout=TIMEOUT)  # subscribed once it says so
        assert note is not None and "following" in note, note

    def until(self, done: Callable[[str], bool]) -> list[str]:
        got = []
        while True:
            line = self.lines.get(timeout=TIMEOUT)
            if line is None:
                raise AssertionError(f"vfioctl events ended first: {got}")
            got.append(line)
            if done(line):
                return got

    def wait(self) -> int:
        return self.proc.wait(TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _pump(stream: IO[str] | None, q: queue.Queue[str | None]) -> None:
    assert stream is not None
    for line in stream:
        q.put(line.rstrip("\n"))
    q.put(None)


@pytest.fixture(name="follow")
def follow_fixture() -> Iterator[Callable[..., Follower]]:
    made: list[Follower] = []

    def start(*argv: str) -> Follower:
        f = Follower(*argv)
        made.append(f)
        return f

    yield start
    for f in made:
        f.kill()


def vfioctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    out, _ = capsys.readouterr()
    return rc, out


def test_events_as_json_lines_until_ctrl_c(
    driver: Driver, follow: Callable[..., Follower], capsys: pytest.CaptureFixture[str]
) -> None:
    f = follow("--driver", driver.target, "events", "--json")
    assert vfioctl(capsys, "--driver", driver.target, "set-state", pci_name(1), "stop")[0] == 0
    lines = f.until(lambda line: '"to_state": "STOP"' in line)
    events = [json.loads(line) for line in lines]  # every line is one JSON document
    changes = [e for e in events if e["kind"] == "state_change"]
    assert [(e["from_state"], e["to_state"]) for e in changes] == [
        ("RUNNING", "RUNNING_P2P"),
        ("RUNNING_P2P", "STOP"),
    ]
    assert all(
        e["device"] == pci_name(1) and e["client"].startswith("vfioclient-") for e in changes
    )
    assert all(isinstance(e["time"], float) for e in events)
    f.proc.send_signal(signal.SIGINT)
    assert f.wait() == 0


def test_events_as_text_for_one_device_until_the_driver_stops(
    driver: Driver, follow: Callable[..., Follower], capsys: pytest.CaptureFixture[str]
) -> None:
    f = follow("--driver", driver.target, "events", "--device", pci_name(2))
    for dev in (pci_name(1), pci_name(2)):
        assert vfioctl(capsys, "--driver", driver.target, "precopy-info", dev)[0] == 0
    lines = f.until(lambda line: "PRE_COPY -> RUNNING" in line)
    assert all(pci_name(2) in line for line in lines)
    assert any("state_change" in line and "RUNNING -> PRE_COPY" in line for line in lines)
    infos = [line for line in lines if "precopy_info" in line]
    assert len(infos) == 3 and all("v2 initial_bytes=" in line for line in infos)
    assert all("client=vfioclient-" in line and "stream=1" in line for line in infos)
    driver.stop()  # the stream ends: exit 0
    assert f.wait() == 0


def test_events_of_an_unknown_device_fail_with_enoent(
    driver: Driver, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["--driver", driver.target, "--json", "events", "--device", "nope"])
    out, err = capsys.readouterr()
    assert rc == 1 and json.loads(out)["error"]["name"] == "ENOENT" and "ENOENT" in err


def test_audit_without_findings(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = vfioctl(capsys, "--driver", driver.target, "audit")
    assert rc == 0 and "no findings" in out
    rc, out = vfioctl(capsys, "--driver", driver.target, "audit", pci_name(1), "--json")
    assert rc == 0 and json.loads(out) == {"device": pci_name(1), "findings": [], "counts": {}}


def test_audit_lists_a_finding_with_its_rule_and_reference(
    driver: Driver, capsys: pytest.CaptureFixture[str]
) -> None:
    with SyncVfioClient.connect(driver.target, client_id="careless") as c:
        fd = c.open_device(pci_name(3))
        data_fd = c.set_state(fd, MigState.PRE_COPY)
        c.reset(fd)  # with the saving fd open
        report = c.audit(pci_name(3))
    (finding,) = report.findings
    assert finding.rule == RESET_WITH_OPEN_STREAM and report.counts == {RESET_WITH_OPEN_STREAM: 1}

    rc, out = vfioctl(capsys, "--driver", driver.target, "audit", pci_name(3))
    assert rc == 0
    assert f"{pci_name(3)} {RESET_WITH_OPEN_STREAM}  client=careless" in out
    assert f"fd {data_fd} of careless" in out
    assert f"reference: {RULES[RESET_WITH_OPEN_STREAM]}" in out
    assert f"counts: {RESET_WITH_OPEN_STREAM}=1" in out
    rc, out = vfioctl(capsys, "--driver", driver.target, "--json", "audit")
    doc: dict[str, Any] = json.loads(out)
    assert rc == 0 and doc["device"] is None and doc["counts"] == {RESET_WITH_OPEN_STREAM: 1}
    (f,) = doc["findings"]
    assert (f["rule"], f["device"], f["client"]) == (
        RESET_WITH_OPEN_STREAM,
        pci_name(3),
        "careless",
    )
    assert f["reference"] == RULES[RESET_WITH_OPEN_STREAM] and f["message"]
    rc, out = vfioctl(capsys, "--driver", driver.target, "audit", pci_name(1))
    assert rc == 0 and "no findings" in out


def test_audit_of_an_unknown_device_fails_with_enoent(
    driver: Driver, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _ = vfioctl(capsys, "--driver", driver.target, "audit", "nope")
    assert rc == 1


def test_sync_client_follows_events(driver: Driver) -> None:
    with (
        SyncVfioClient.connect(driver.target) as watcher,
        SyncVfioClient.connect(driver.target, client_id="actor") as actor,
    ):
        events = watcher.events(pci_name(2))  # subscribed when it returns
        actor.set_state(actor.open_device(pci_name(2)), MigState.STOP)
        got = []
        for ev in events:
            got.append(ev)
            if isinstance(ev.payload, StateChanged) and ev.payload.to_state == "STOP":
                break
        events.close()
    assert [e.client for e in got] == ["actor", "actor"]
