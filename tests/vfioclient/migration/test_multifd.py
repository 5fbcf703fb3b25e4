"""Multifd stop-copy and live progress in vfioclient.migration, against the
driver service in this process over an in-process firmware with a live
workload (tests/support/vfioclient_migration.py).

The data check: every byte the source read (precopy reads, then the stop-copy
stream) must be what the destination wrote, in the same order, even though
the stop-copy packets crossed four channels and arrived out of order.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from driver.vfio.uapi import MigState
from tests.support.vfioclient_migration import InProcessRig, in_process_rig
from vfioclient.migration import (
    DeviceMigration,
    DevicePair,
    MigrationOptions,
    MigrationReport,
    Progress,
    TerminalProgress,
    migrate,
)

pytestmark = pytest.mark.grpc

CHUNK = 16 << 10  # small packets: many of them in the stop-copy


@pytest.fixture(name="rig", params=["shm", "grpc"])
async def rig_fixture(request: pytest.FixtureRequest) -> AsyncIterator[InProcessRig]:
    """Each test on both data paths (the reorder buffer holds user memory
    slots on one, bytes on the other)."""
    async with in_process_rig() as rig:
        rig.data_path = request.param
        yield rig


def options(rig: InProcessRig, s: int, d: int, **kw: Any) -> MigrationOptions:
    """Multifd over 4 channels, small packets; a REINIT at the first ack; the
    digests taken when both sides are suspended."""
    reconfigured = False

    async def on_ack(_: DeviceMigration) -> None:
        nonlocal reconfigured
        if not reconfigured:
            reconfigured = True
            rig.fw.reconfigure(s)

    async def loaded() -> None:
        rig.digests.append((rig.fw.digest(s), rig.fw.digest(d)))

    o = MigrationOptions(
        downtime_limit_s=0.3,
        bandwidth_estimate=100 << 20,
        max_precopy_iterations=2000,
        iteration_interval_s=0.002,
        buffer_cap=CHUNK,
        multifd_channels=4,
        on_switchover_ack=on_ack,
        on_destinations_loaded=loaded,
        data_path=rig.data_path,
    )
    for k, v in kw.items():
        setattr(o, k, v)
    return o


async def check(rig: InProcessRig, pair: DevicePair, r: MigrationReport) -> None:
    assert r.status == "completed" and r.error is None
    assert [(x.device, x.phase, x.handling) for x in r.reinits] == [
        (pair.name, "precopy", "ack re-armed")
    ]
    (dev,) = r.devices
    assert dev.data_path == rig.data_path
    assert dev.acks == 2 and dev.precopy_bytes > 0 and dev.stop_copy_bytes > 0
    # Several packets (plus the empty last one), all of the stop-copy data.
    assert dev.multifd_packets >= 4
    assert dev.multifd_packets - 1 >= -(-dev.stop_copy_bytes // CHUNK)  # chunks <= CHUNK
    # Written strictly in order: the destination got exactly what the source read.
    assert b"".join(rig.written) == b"".join(rig.read)
    assert sum(map(len, rig.read)) == dev.precopy_bytes + dev.stop_copy_bytes
    (digests,) = rig.digests
    assert digests[0] == digests[1]
    assert await rig.dst.get_state(pair.destination_fd) == MigState.RUNNING
    assert await rig.src.get_state(pair.source_fd) == MigState.STOP


async def test_multifd_out_of_order_written_in_order(rig: InProcessRig) -> None:
    pair, s, d = await rig.pair()
    rig.record_data()
    r = await migrate([pair], options(rig, s, d))
    await check(rig, pair, r)
    (dev,) = r.devices
    assert dev.multifd_out_of_order > 0 and dev.multifd_max_reorder_depth > 0
    assert 0 < dev.multifd_max_queued_bytes <= 32 << 20
    assert '"multifd_max_reorder_depth"' in r.to_json()


async def test_multifd_queued_bytes_bound(rig: InProcessRig) -> None:
    pair, s, d = await rig.pair()
    rig.record_data()
    bound = 3 * CHUNK
    r = await migrate([pair], options(rig, s, d, multifd_max_queued_bytes=bound))
    await check(rig, pair, r)
    (dev,) = r.devices
    assert 0 < dev.multifd_max_queued_bytes <= bound
    # (The bound is on bytes, not packets: a read can return less than a
    # buffer when less is ready, and the empty last packet always fits, so
    # the count of packets waiting for a missing one has no fixed bound.)


async def test_multifd_bound_below_one_packet_sends_one_at_a_time(rig: InProcessRig) -> None:
    pair, s, d = await rig.pair()
    rig.record_data()
    r = await migrate([pair], options(rig, s, d, multifd_max_queued_bytes=1))
    await check(rig, pair, r)
    (dev,) = r.devices
    assert dev.multifd_max_queued_bytes <= CHUNK
    assert dev.multifd_out_of_order == 0 and dev.multifd_max_reorder_depth == 0


class Recorder(Progress):
    def __init__(self) -> None:
        self.phases: list[str] = []
        self.names: list[str] = []
        self.moved: dict[tuple[str, str], int] = {}
        self.pendings: list[tuple[str, int, int]] = []
        self.reinits: list[tuple[str, int]] = []
        self.closed = 0

    def devices(self, names: Any) -> None:
        self.names = list(names)

    def phase(self, name: str) -> None:
        self.phases.append(name)

    def bytes_moved(self, device: str, phase: str, n: int) -> None:
        assert n > 0
        self.moved[device, phase] = self.moved.get((device, phase), 0) + n

    def pending(self, device: str, initial_bytes: int, dirty_bytes: int) -> None:
        self.pendings.append((device, initial_bytes, dirty_bytes))

    def reinit(self, device: str, initial_bytes: int) -> None:
        self.reinits.append((device, initial_bytes))

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("channels", [0, 4])
async def test_progress_recorder_adds_up(rig: InProcessRig, channels: int) -> None:
    pair, s, d = await rig.pair()
    p = Recorder()
    r = await migrate([pair], options(rig, s, d, multifd_channels=channels, progress=p))
    assert r.status == "completed"
    assert p.phases == ["setup", "precopy", "switchover", "cleanup", "completed"]
    assert p.names == [pair.name] and p.closed == 1
    (dev,) = r.devices
    assert p.moved[pair.name, "precopy"] == dev.precopy_bytes == r.precopy_bytes
    assert p.moved[pair.name, "stop-copy"] == dev.stop_copy_bytes == r.stop_copy_bytes
    assert p.reinits == [(x.device, x.initial_bytes) for x in r.reinits] and len(p.reinits) == 1
    assert any(i > 0 for _, i, _ in p.pendings)
    assert p.pendings[-1] == (pair.name, 0, 0)  # drained


async def test_a_failing_progress_does_not_break_the_migration(rig: InProcessRig) -> None:
    pair, s, d = await rig.pair()

    class Broken(Progress):
        def bytes_moved(self, device: str, phase: str, n: int) -> None:
            raise RuntimeError("boom")

    r = await migrate([pair], options(rig, s, d, progress=Broken()))
    assert r.status == "completed"


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def drive(p: TerminalProgress) -> None:
    p.devices(["vf1"])
    p.phase("precopy")
    p.pending("vf1", 100, 20)
    p.bytes_moved("vf1", "precopy", 1 << 20)
    p.reinit("vf1", 50)
    p.phase("completed")
    p.close()


def test_terminal_progress_draws_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    out = FakeTty()
    drive(TerminalProgress(out, min_interval_s=0))
    text = out.getvalue()
    assert "\r" in text and "[completed]" in text and "vf1 [" in text and "reinit 1" in text
    assert text.endswith("\n")


@pytest.mark.parametrize(
    ("stream", "ci"), [(io.StringIO, None), (FakeTty, "true")], ids=["not-a-tty", "ci"]
)
def test_terminal_progress_is_silent_off_a_tty_or_in_ci(
    monkeypatch: pytest.MonkeyPatch, stream: Callable[[], io.StringIO], ci: str | None
) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    out = stream()
    p = TerminalProgress(out, min_interval_s=0)
    assert not p.enabled
    drive(p)
    assert out.getvalue() == ""
