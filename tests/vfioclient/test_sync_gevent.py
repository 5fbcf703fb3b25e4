"""SyncVfioClient under gevent, as Locust runs it: greenlets of one process
after `gevent.monkey.patch_all()` and `grpc.experimental.gevent.init_gevent()`,
against a real `vfio-driver serve` process.

Each scenario runs in a fresh interpreter (gevent patches must come before
anything else is imported): `main` below is its entry point, and prints
what it saw as JSON for the test to check.  Every scenario runs under a
timeout, so a hang fails instead of stalling the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent  # type: ignore[import-untyped]
import pytest

from driver.shards import pci_name
from tests.support.vfioctl_driver import Driver
from tests.vfioclient.test_sync import check_round, precopy_round, save_and_resume
from vfioclient import VfioClientError
from vfioclient.sync import SyncVfioClient
from vfioclient.uapi import MigState

pytestmark = pytest.mark.grpc

ROOT = Path(__file__).resolve().parents[2]
PATCH = "from gevent import monkey; monkey.patch_all(); "
INIT_GRPC = "import grpc.experimental.gevent; grpc.experimental.gevent.init_gevent(); "
RUN = "import sys; from tests.vfioclient.test_sync_gevent import main; main(sys.argv[1:])"
OWN, SHARED = 20, 6  # users with a client each (twice gevent's pool of 10), users of one client
SECONDS = 60.0  # a scenario's bound (greenlets not done by then: hung)


def run_greenlets(*argv: str, init_grpc: bool = True) -> subprocess.CompletedProcess[str]:
    prelude = PATCH + (INIT_GRPC if init_grpc else "") + RUN
    return subprocess.run(
        [sys.executable, "-c", prelude, *argv],
        capture_output=True, text=True, cwd=ROOT, timeout=SECONDS + 30, check=False,
    )  # fmt: skip


def outcome(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.fixture(name="many_vfs")
def many_vfs_fixture() -> Iterator[Driver]:
    d = Driver.start(vfs=OWN + SHARED)
    try:
        yield d
    finally:
        d.stop()


def test_greenlets_run_precopy_rounds_at_once(many_vfs: Driver) -> None:
    """26 greenlets, 20 with a client each and 6 on one shared client, each
    a PRE_COPY round (precopy_info loops, reads to ENOMSG, EBADF on a closed
    fd): all finish in time, with the kernel's errnos as VfioClientError.
    The 20 clients were all connected at once, twice the hub's threadpool:
    an open client holds none of its threads (a Session read by a thread of
    its own would take one each, and the calls queued behind them would
    never run)."""
    start = time.monotonic()
    seen = outcome(run_greenlets("rounds", many_vfs.target))
    took = time.monotonic() - start
    assert seen["unfinished"] == [] and seen["failed"] == [], seen
    assert len(seen["rounds"]) == OWN + SHARED
    for r in seen["rounds"]:
        check_round(r)
    assert seen["most_connected"] == OWN + 1  # and the shared one
    assert seen["most_connected"] > seen["pool"]
    assert seen["longest_stall"] < 2.0, seen  # the hub kept running
    assert took < SECONDS


def test_a_greenlet_waits_for_events_while_others_call(driver: Driver) -> None:
    """A greenlet blocked in an Events stream leaves the others running: the
    actor's SET reaches it, as StateChanges to STOP."""
    seen = outcome(run_greenlets("events", driver.target))
    assert seen["followed"], seen
    assert seen["states"][-1] == "STOP", seen
    assert seen["clients"] == ["actor"] * len(seen["states"])


def test_a_migration_streams_between_greenlets(driver: Driver) -> None:
    """Write's requests come from a ReadStream of the source, read in the
    greenlet grpc consumes them in, that yields between chunks: the image
    arrives whole (the two VFs' digests agree)."""
    seen = outcome(run_greenlets("migrate", driver.target))
    assert seen["written"] == seen["read"] > 0
    a, b = driver.digests(1, 2)
    assert a == b


def test_connect_refuses_gevent_without_grpcs_integration() -> None:
    """gevent patched, init_gevent() not called: every call would stop all
    greenlets while it waits, and a write would never end.  connect says so."""
    done = run_greenlets("connect", "127.0.0.1:1", init_grpc=False)
    assert done.returncode != 0
    assert "RuntimeError" in done.stderr and "init_gevent()" in done.stderr, done.stderr


# --- in the greenlets' process ---------------------------------------------------------


def main(argv: list[str]) -> None:
    """Run scenario argv[0] on the driver at argv[1]; its JSON on stdout."""
    scenarios: dict[str, Callable[[str], dict[str, Any]]] = {
        "rounds": rounds,
        "events": events,
        "migrate": migrate,
        "connect": connect,
    }
    name, target = argv
    print(json.dumps(scenarios[name](target)), flush=True)


def rounds(target: str) -> dict[str, Any]:
    connected = [0, 0]  # now, most

    def own(vf: int) -> dict[str, int]:
        with SyncVfioClient.connect(target) as c:
            connected[0] += 1
            connected[1] = max(connected)
            gevent.sleep(0.2)  # every client connected before any leaves
            try:
                return precopy_round(c, pci_name(vf))
            finally:
                connected[0] -= 1

    shared = SyncVfioClient.connect(target)
    stall = StallMeter()
    users = [gevent.spawn(own, vf) for vf in range(1, OWN + 1)]
    users += [
        gevent.spawn(precopy_round, shared, pci_name(vf)) for vf in range(OWN + 1, OWN + SHARED + 1)
    ]
    gevent.joinall(users, timeout=SECONDS)
    shared.close_client()
    longest_stall = stall.stop()
    return {
        "rounds": [g.value for g in users if g.successful()],
        "failed": [repr(g.exception) for g in users if g.ready() and not g.successful()],
        "unfinished": [i for i, g in enumerate(users) if not g.ready()],
        "most_connected": connected[1] + 1,
        "pool": gevent.get_hub().threadpool.maxsize,
        "longest_stall": longest_stall,
    }


class StallMeter:
    """A greenlet that ticks every 5 ms: `longest` is the longest gap
    between two ticks, the longest the hub was kept from running."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._greenlet = gevent.spawn(self._tick)

    def _tick(self) -> None:
        last = time.monotonic()
        while True:
            gevent.sleep(0.005)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    def stop(self) -> float:
        self._greenlet.kill()
        return self.longest


def events(target: str) -> dict[str, Any]:
    with (
        SyncVfioClient.connect(target) as watcher,
        SyncVfioClient.connect(target, client_id="actor") as actor,
    ):
        stream = watcher.events(pci_name(1))
        states: list[str] = []
        clients: list[str] = []

        def follow() -> None:
            for ev in stream:
                to_state = getattr(ev.payload, "to_state", None)
                if to_state is not None:
                    states.append(to_state)
                    clients.append(ev.client)
                    if to_state == "STOP":
                        return

        follower = gevent.spawn(follow)
        gevent.sleep(0.2)  # the follower is waiting in its call now
        actor.set_state(actor.open_device(pci_name(1)), MigState.STOP)
        follower.join(timeout=SECONDS)
        stream.close()
        return {"followed": follower.successful(), "states": states, "clients": clients}


def migrate(target: str) -> dict[str, Any]:
    with SyncVfioClient.connect(target) as src, SyncVfioClient.connect(target) as dst:
        sfd, dfd, data_fd, resume_fd = save_and_resume(src, dst, 1, 2)
        read = 0

        def chunks() -> Iterator[bytes]:
            nonlocal read
            for chunk in src.read_stream(data_fd, chunk_size=16 << 10):
                read += len(chunk)
                gevent.sleep(0)
                yield chunk

        written = dst.write(resume_fd, chunks())
        dst.set_state(dfd, MigState.STOP)
        src.set_state(sfd, MigState.STOP)
        return {"read": read, "written": written}


def connect(target: str) -> dict[str, Any]:
    try:
        SyncVfioClient.connect(target, timeout=2.0)
    except VfioClientError as e:
        return {"errno": e.errno}
    return {}
