"""The orchestrator audit (driver/audit.py, the Audit RPC): each rule
provoked over real gRPC, the finding naming its rule, client, device and
reference; the well-behaved way of doing the same raises none; and the
reference orchestrator (vfioclient.orchestrator) raises none either, with a
REINIT during precopy, a late REINIT it goes back to precopy for, a late
REINIT it fails on, and multifd."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driver.audit import (
    READ_AFTER_EOF,
    REINIT_WITHOUT_V2,
    RESET_WITH_OPEN_STREAM,
    RULES,
    STOP_COPY_WITH_INITIAL_BYTES,
    STREAM_LEFT_OPEN,
    AuditLog,
)
from driver.events import EventBus, Finding
from driver.vfio.uapi import VFIO_PRECOPY_INFO_REINIT, MigState
from tests.support.driver_service import (
    DriverUnderTest,
    Vf,
    opened,
)
from vfioclient import VfioClient, VfioClientError
from vfioclient.client import read_all
from vfioclient.migration import DevicePair, MigrationError, MigrationOptions, migrate

pytestmark = pytest.mark.grpc

S = MigState


@dataclass
class Audited:
    drv: DriverUnderTest
    c: VfioClient  # x-vfio-client "orch"

    async def open(self, *, v2: bool = True) -> tuple[Vf, int]:
        (vf,) = await self.drv.create_vfs()
        fd = await self.c.open_device(vf.name)
        if v2:
            assert await self.c.enable_precopy_info_v2(fd)
        return vf, fd

    async def findings(self, vf: Vf) -> list[Finding]:
        return (await self.c.audit(vf.name)).findings


@pytest.fixture(name="au")
async def audited_fixture(inproc: DriverUnderTest) -> AsyncIterator[Audited]:
    async with await VfioClient.connect(inproc.target, client_id="orch") as c:
        yield Audited(inproc, c)


def only(findings: list[Finding], rule: str, vf: Vf, client: str = "orch") -> Finding:
    """The one finding, and that it says who, where and why."""
    (f,) = findings
    assert (f.rule, f.device, f.client) == (rule, vf.name, client)
    assert f.reference == RULES[rule] and f.time > 0 and f.message
    return f


async def drain_precopy(c: VfioClient, data_fd: int) -> int:
    """Read what PRE_COPY has now, to ENOMSG."""
    n = 0
    with pytest.raises(VfioClientError) as e:
        async for chunk in c.read_stream(data_fd):
            n += len(chunk)
    assert e.value.errno == errno.ENOMSG
    return n


# --- stop-copy-with-initial-bytes ------------------------------------------------------


async def test_stop_copy_with_initial_bytes_unread(au: Audited) -> None:
    vf, fd = await au.open()
    data_fd = await opened(au.c, fd, S.PRE_COPY)
    info = await au.c.precopy_info(data_fd)
    assert info.initial_bytes > 0
    await au.c.set_state(fd, S.STOP_COPY)
    f = only(await au.findings(vf), STOP_COPY_WITH_INITIAL_BYTES, vf)
    assert f"{info.initial_bytes} initial bytes unread" in f.message
    assert "PRE_COPY_P2P -> STOP_COPY" in f.message and f.data_fd == data_fd and f.stream > 0
    assert "include/uapi/linux/vfio.h" in f.reference and "initial_bytes" in f.reference


async def test_stop_copy_before_the_reinit_initial_bytes_were_read(au: Audited) -> None:
    """The stronger message: a REINIT was answered and its new initial
    bytes are still in the stream."""
    vf, fd = await au.open()
    data_fd = await opened(au.c, fd, S.PRE_COPY)
    await drain_precopy(au.c, data_fd)
    await au.drv.link.reconfigure(vf.vhca_id)
    info = await au.c.precopy_info(data_fd)
    assert info.reinit and info.initial_bytes > 0
    await au.c.set_state(fd, S.STOP_COPY)
    f = only(await au.findings(vf), STOP_COPY_WITH_INITIAL_BYTES, vf)
    assert (
        f"a REINIT announced (VFIO_PRECOPY_INFO_REINIT, initial_bytes {info.initial_bytes})"
        in f.message
    )
    assert "switchover-ack" in f.message


async def test_stop_copy_with_new_initial_data_a_v1_client_cannot_see(au: Audited) -> None:
    vf, fd = await au.open(v2=False)
    data_fd = await opened(au.c, fd, S.PRE_COPY)
    await drain_precopy(au.c, data_fd)
    await au.drv.link.reconfigure(vf.vhca_id)
    info = await au.c.precopy_info(data_fd)
    assert not info.reinit and info.initial_bytes == 0 and info.dirty_bytes > 0
    await au.c.set_state(fd, S.STOP_COPY)
    f = only(await au.findings(vf), STOP_COPY_WITH_INITIAL_BYTES, vf)
    assert "OPER_MIGRATION_INIT" in f.message and "MIG_PRECOPY_INFOv2" in f.message


async def test_stop_copy_once_the_initial_bytes_are_read_raises_nothing(au: Audited) -> None:
    vf, fd = await au.open()
    data_fd = await opened(au.c, fd, S.PRE_COPY)
    await drain_precopy(au.c, data_fd)
    await au.drv.link.reconfigure(vf.vhca_id)
    assert (await au.c.precopy_info(data_fd)).reinit
    await drain_precopy(au.c, data_fd)
    info = await au.c.precopy_info(data_fd)
    assert info.initial_bytes == 0 and not info.reinit
    await au.c.set_state(fd, S.STOP_COPY)
    assert await au.findings(vf) == []


@given(
    f_pos=st.integers(0, 1000),
    initial_end=st.integers(0, 1000),
    max_pos=st.integers(0, 1000),
    reinit=st.booleans(),
    fw_init_end=st.integers(0, 1000),
)
def test_leaving_precopy_is_reported_exactly_when_initial_data_is_unread(
    f_pos: int, initial_end: int, max_pos: int, reinit: bool, fw_init_end: int
) -> None:
    """A finding iff the stream position is before the end of the driver's
    initial data, or before the new initial data the firmware reported to a
    v1 client (as far as it was saved); the REINIT message when a REINIT
    was answered and the initial data is unread."""
    log = AuditLog()
    if reinit:
        log.precopy_answered(
            "d", 1, v2=True, flags=1, reinit=True, initial_bytes=7, fw_init_end=fw_init_end
        )
    elif fw_init_end:
        log.precopy_answered(
            "d", 1, v2=False, flags=0, reinit=False, initial_bytes=0, fw_init_end=fw_init_end
        )
    arc = "PRE_COPY_P2P -> STOP_COPY"
    log.leaving_precopy("d", 1, arc=arc, f_pos=f_pos, initial_end=initial_end, max_pos=max_pos)
    found = log.findings("d")
    v1_unread = not reinit and min(fw_init_end, max_pos) > f_pos
    assert bool(found) == (initial_end > f_pos or v1_unread)
    if found:
        assert found[0].rule == STOP_COPY_WITH_INITIAL_BYTES
        assert ("a REINIT announced" in found[0].message) == (reinit and initial_end > f_pos)
        assert ("OPER_MIGRATION_INIT" in found[0].message) == (initial_end <= f_pos)


# --- reinit-without-v2 ----------------------------------------------------------------------


async def test_precopy_info_with_flags_without_the_v2_opt_in(au: Audited) -> None:
    vf, fd = await au.open(v2=False)
    data_fd = await opened(au.c, fd, S.PRE_COPY)
    assert (await au.c.precopy_info(data_fd)).flags == 0  # flags 0: fine
    assert await au.findings(vf) == []
    echoed = await au.c.precopy_info(data_fd, flags=VFIO_PRECOPY_INFO_REINIT)
    assert echoed.reinit  # the v1 echo: the client's own bit
    await au.c.precopy_info(data_fd, flags=VFIO_PRECOPY_INFO_REINIT)  # told once per stream
    f = only(await au.findings(vf), REINIT_WITHOUT_V2, vf)
    assert "flags 0x1" in f.message and "echo" in f.message and f.data_fd == data_fd
    assert "vfio_check_precopy_ioctl" in f.reference


async def test_precopy_info_with_flags_after_the_opt_in_is_fine(au: Audited) -> None:
    vf, fd = await au.open(v2=True)
    data_fd = await opened(au.c, fd, S.PRE_COPY)
    assert not (await au.c.precopy_info(data_fd, flags=VFIO_PRECOPY_INFO_REINIT)).reinit
    assert await au.findings(vf) == []


# --- read-after-eof -------------------------------------------------------------------------


async def test_read_after_the_end_of_a_stop_copy_stream(au: Audited) -> None:
    vf, fd = await au.open()
    data_fd = await opened(au.c, fd, S.STOP_COPY)
    assert await read_all(au.c, data_fd)  # ends at the first 0: fine
    assert await au.findings(vf) == []
    assert await au.c.read(data_fd, 4096) == b""
    assert await au.c.read(data_fd, 4096) == b""
    f = only(await au.findings(vf), READ_AFTER_EOF, vf)
    assert "permanent" in f.message and f.data_fd == data_fd
    assert au.drv.server.registry.audit.counts[READ_AFTER_EOF] == 1


# --- stream-left-open -----------------------------------------------------------------------


async def test_saving_fd_still_open_at_the_next_state_change(au: Audited) -> None:
    vf, fd = await au.open()
    data_fd = await opened(au.c, fd, S.STOP_COPY)
    await read_all(au.c, data_fd)
    await au.c.set_state(fd, S.STOP)  # ends the stream; closing right after is fine ...
    assert await au.findings(vf) == []
    async with await VfioClient.connect(au.drv.target, client_id="other") as other:
        await other.set_state(await other.open_device(vf.name), S.RUNNING)  # ... not this late
    f = only(await au.findings(vf), STREAM_LEFT_OPEN, vf)  # the holder is named
    assert f.data_fd == data_fd and f.stream > 0
    assert "saving data fd" in f.message and "STOP_COPY -> STOP ended" in f.message
    assert "STOP -> RUNNING" in f.message and "vfio_save_cleanup" in f.reference


async def test_resuming_fd_still_open_once_running(au: Audited) -> None:
    vf, fd = await au.open()
    data_fd = await opened(au.c, fd, S.RESUMING)
    await au.c.set_state(fd, S.RUNNING)  # RESUMING -> STOP ends the stream
    await au.c.set_state(fd, S.STOP)
    f = only(await au.findings(vf), STREAM_LEFT_OPEN, vf)
    assert "resuming data fd" in f.message and "RESUMING -> STOP ended" in f.message
    assert f.data_fd == data_fd


async def test_closing_the_data_fd_once_its_state_is_left_raises_nothing(au: Audited) -> None:
    vf, fd = await au.open()
    for state in (S.STOP_COPY, S.RESUMING):
        data_fd = await opened(au.c, fd, state)
        await au.c.set_state(fd, S.STOP)
        await au.c.close(data_fd)
    await au.c.set_state(fd, S.RUNNING)
    assert await au.findings(vf) == []


# --- reset-with-open-stream -----------------------------------------------------------------


async def test_reset_with_a_data_fd_open(au: Audited) -> None:
    vf, fd = await au.open()
    data_fd = await opened(au.c, fd, S.PRE_COPY)
    await au.c.reset(fd)
    f = only(await au.findings(vf), RESET_WITH_OPEN_STREAM, vf)
    assert f"saving stream 1 (fd {data_fd} of orch)" in f.message
    assert "VFIO_DEVICE_RESET" in f.reference and "mlx5vf_disable_fds" in f.reference


async def test_reset_after_closing_the_data_fd_raises_nothing(au: Audited) -> None:
    vf, fd = await au.open()
    data_fd = await opened(au.c, fd, S.RESUMING)
    await au.c.close(data_fd)
    await au.c.reset(fd)  # how RESUMING is aborted
    assert await au.findings(vf) == []


def test_reset_during_a_read_or_write_in_progress() -> None:
    log = AuditLog()
    log.device_reset("d", [1], io_in_progress=1)
    (f,) = log.findings("d")
    assert f.rule == RESET_WITH_OPEN_STREAM and "1 read/write in progress" in f.message


# --- the log and the RPC ----------------------------------------------------------------------


async def test_findings_are_events_and_counted_by_rule(au: Audited) -> None:
    vf, fd = await au.open()
    async with au.c.events(vf.name) as events:
        await events.ready()
        await opened(au.c, fd, S.PRE_COPY)
        await au.c.reset(fd)
        async for ev in events:
            if ev.kind == "audit":
                break
    assert isinstance(ev.payload, Finding) and ev.payload.rule == RESET_WITH_OPEN_STREAM
    assert (ev.device, ev.client, ev.data_fd) == (vf.name, "orch", -1)
    report = await au.c.audit()
    assert report.counts == {RESET_WITH_OPEN_STREAM: 1}
    assert report.findings == [ev.payload]
    assert au.drv.server.servicer.audit.counts == {RESET_WITH_OPEN_STREAM: 1}


async def test_audit_of_an_unknown_device_is_enoent(au: Audited) -> None:
    with pytest.raises(VfioClientError) as e:
        await au.c.audit("0000:81:0f.7")
    assert e.value.errno == errno.ENOENT


def test_every_rule_names_a_source_to_check() -> None:
    assert set(RULES) == {
        STOP_COPY_WITH_INITIAL_BYTES,
        REINIT_WITHOUT_V2,
        READ_AFTER_EOF,
        STREAM_LEFT_OPEN,
        RESET_WITH_OPEN_STREAM,
    }
    for rule, ref in RULES.items():
        assert rule == rule.lower() and " " not in rule
        assert "vfio.h" in ref and "vfio-mlx5-migration.md §" in ref


def test_the_log_keeps_the_newest_findings_per_device_and_counts_all() -> None:
    bus = EventBus()
    log = AuditLog(bus, max_findings=3)
    for _ in range(5):
        log.device_reset("d", [], io_in_progress=1)
    assert len(log.findings("d")) == 3 and log.counts[RESET_WITH_OPEN_STREAM] == 5
    assert log.device_counts("d") == {RESET_WITH_OPEN_STREAM: 5} and log.device_counts("e") == {}


# --- the reference orchestrator raises none --------------------------------------------------


@dataclass
class Qemu:
    """The reference orchestrator's two sides, as two clients of the driver."""

    drv: DriverUnderTest
    src: VfioClient
    dst: VfioClient

    async def pair(self) -> tuple[DevicePair, int]:
        """A source and a destination VF with a workload, opened; the source's vhca id."""
        s, d = await self.drv.create_vfs(2, size=1 << 20, dirty_bytes_per_s=8 << 20)
        sfd, dfd = await self.src.open_device(s.name), await self.dst.open_device(d.name)
        return DevicePair(self.src, sfd, self.dst, dfd, name=s.name), s.vhca_id

    def reconfigure_once(self, vhca_id: int) -> Callable[..., Awaitable[None]]:
        """A hook that reconfigures the VF the first time it runs."""
        done = False

        async def hook(*_: object) -> None:
            nonlocal done
            if not done:
                done = True
                await self.drv.link.reconfigure(vhca_id)

        return hook

    def findings(self) -> list[Finding]:
        return self.drv.server.registry.audit.findings()


@pytest.fixture(name="qemu")
async def qemu_fixture(inproc: DriverUnderTest) -> AsyncIterator[Qemu]:
    async with (
        await VfioClient.connect(inproc.target, client_id="qemu-src") as src,
        await VfioClient.connect(inproc.target, client_id="qemu-dst") as dst,
    ):
        yield Qemu(inproc, src, dst)


def options(**kw: Any) -> MigrationOptions:
    """Converges once acked (30 MiB under the downtime limit)."""
    return MigrationOptions(bandwidth_estimate=100 << 20, iteration_interval_s=0.002, **kw)


async def test_orchestrator_with_a_reinit_during_precopy_raises_no_finding(qemu: Qemu) -> None:
    pair, s = await qemu.pair()
    r = await migrate([pair], options(on_switchover_ack=qemu.reconfigure_once(s)))
    assert r.status == "completed" and [e.handling for e in r.reinits] == ["ack re-armed"]
    assert qemu.findings() == []


async def test_orchestrator_going_back_to_precopy_on_a_late_reinit_raises_no_finding(
    qemu: Qemu,
) -> None:
    """vfioctl migrate --allow-late-reinit."""
    pair, s = await qemu.pair()
    o = options(fail_on_late_reinit=False, on_switchover_decision=qemu.reconfigure_once(s))
    r = await migrate([pair], o)
    assert r.status == "completed"
    assert [e.handling for e in r.reinits] == ["ack re-armed, back to precopy"]
    assert qemu.findings() == []


async def test_orchestrator_failing_on_a_late_reinit_raises_no_finding(qemu: Qemu) -> None:
    """The failure path too: the source back to RUNNING, the destination
    reset out of RESUMING, the data fds closed."""
    pair, s = await qemu.pair()
    with pytest.raises(MigrationError, match="after the switchover decision"):
        await migrate([pair], options(on_switchover_decision=qemu.reconfigure_once(s)))
    r = await migrate([pair], options())  # and again, on the same device fds
    assert r.status == "completed"
    assert qemu.findings() == []


async def test_orchestrator_with_multifd_and_two_devices_raises_no_finding(qemu: Qemu) -> None:
    (p1, s1), (p2, _) = await qemu.pair(), await qemu.pair()
    o = options(multifd_channels=2, on_switchover_ack=qemu.reconfigure_once(s1))
    r = await migrate([p1, p2], o)
    assert r.status == "completed" and len(r.reinits) == 1
    assert qemu.findings() == []
