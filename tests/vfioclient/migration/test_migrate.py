"""The reference migration (vfioclient.migration) against the driver
service in this process over an in-process firmware with a live workload.

Digests: `on_destinations_loaded` runs when every source has been read to the
end of its STOP_COPY stream and every destination has gone RESUMING -> STOP
(loaded and validated).  Both VFs are then fully suspended, and the firmware's
workload only advances while a VF runs, so neither state can change: their
digests must be equal at that moment (after it the destination runs and its
workload makes it diverge).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from driver.vfio.uapi import MigState
from fwemu.link.ifc import Fault, FaultKind, Opcode, VfCaps
from fwemu.model.firmware import Firmware
from tests.support.vfioclient_migration import InProcessRig, in_process_rig, options
from vfioclient.migration import (
    DeviceMigration,
    MigrationError,
    MigrationOptions,
    MigrationReport,
    SwitchoverAck,
    at_first_ack,
    migrate,
)

pytestmark = pytest.mark.grpc


@pytest.fixture(name="rig")
async def rig_fixture() -> AsyncIterator[InProcessRig]:
    async with in_process_rig() as rig:
        yield rig


def reconfigure_on_first_ack(fw: Firmware, vhca_ids: dict[str, int]) -> MigrationOptions:
    """Reconfigure a device's source when its destination is about to give its
    first switchover-ack: the REINIT comes after an ack was obtained."""
    o = options()
    for name, vhca in vhca_ids.items():

        async def reconfigure(vhca: int = vhca) -> None:
            fw.reconfigure(vhca)

        at_first_ack(o, name, reconfigure)
    return o


def check_completed(r: MigrationReport) -> None:
    assert r.status == "completed" and r.error is None
    assert r.converged and r.iterations >= 1
    assert r.downtime_s is not None and 0 < r.downtime_s < r.total_s
    assert {"setup", "precopy", "switchover", "cleanup"} <= set(r.phases)
    for d in r.devices:
        assert d.pre_copy and d.p2p and d.precopy_info_v2 and d.dma_logging
        assert 0 < d.buffer_size <= 1 << 20
        assert d.precopy_bytes > 0 and d.stop_copy_bytes > 0
    assert r.precopy_bytes == sum(d.precopy_bytes for d in r.devices)
    assert '"reinits"' in r.to_json()


async def test_reinit_during_precopy_rearms_the_ack(rig: InProcessRig) -> None:
    pair, s, d = await rig.pair()
    o = reconfigure_on_first_ack(rig.fw, {pair.name: s})
    o.on_destinations_loaded = rig.digest_hook([(s, d)]).on_destinations_loaded
    r = await migrate([pair], o)
    check_completed(r)
    (ev,) = r.reinits
    assert (ev.device, ev.phase, ev.handling) == (pair.name, "precopy", "ack re-armed")
    assert ev.initial_bytes > 0
    (dev,) = r.devices
    # Two INIT_DATA_SENT / acks: the switchover waited for the new initial bytes,
    # which were all read in precopy after the REINIT.
    assert dev.init_data_sent == 2 and dev.acks == 2
    assert dev.precopy_bytes - ev.precopy_bytes_before >= ev.initial_bytes
    (digests,) = rig.digests
    assert digests[0] == digests[1]
    assert await rig.dst.get_state(pair.destination_fd) == MigState.RUNNING
    assert await rig.src.get_state(pair.source_fd) == MigState.STOP


async def test_no_migration_state_cap_never_reinits(rig: InProcessRig) -> None:
    pair, s, d = await rig.pair(caps=VfCaps(migration_state=False))
    o = reconfigure_on_first_ack(rig.fw, {pair.name: s})
    o.on_destinations_loaded = rig.digest_hook([(s, d)]).on_destinations_loaded
    r = await migrate([pair], o)
    check_completed(r)
    assert r.reinits == []
    assert r.devices[0].acks == 1
    (digests,) = rig.digests
    assert digests[0] == digests[1]  # the reconfiguration travelled as dirty data


async def test_reinit_after_the_switchover_decision_fails(rig: InProcessRig) -> None:
    pair, s, _ = await rig.pair()

    async def decided() -> None:
        rig.fw.reconfigure(s)

    with pytest.raises(MigrationError, match="after the switchover decision") as e:
        await migrate([pair], options(on_switchover_decision=decided))
    r = e.value.report
    assert r is not None and r.status == "failed"
    assert [(x.phase, x.handling) for x in r.reinits] == [("after-switchover-decision", "failed")]
    # Recovery: the source runs again, the destination was reset out of RESUMING.
    assert await rig.src.get_state(pair.source_fd) == MigState.RUNNING
    assert await rig.dst.get_state(pair.destination_fd) == MigState.RUNNING
    # ... and the devices can migrate again.
    r2 = await migrate([pair], options())
    check_completed(r2)


async def test_late_reinit_goes_back_to_precopy_when_allowed(rig: InProcessRig) -> None:
    pair, s, d = await rig.pair()
    calls = 0

    async def decided() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            rig.fw.reconfigure(s)

    o = rig.digest_hook([(s, d)])
    o.fail_on_late_reinit = False
    o.on_switchover_decision = decided
    r = await migrate([pair], o)
    check_completed(r)
    assert calls == 2
    assert [(x.phase, x.handling) for x in r.reinits] == [
        ("after-switchover-decision", "ack re-armed, back to precopy")
    ]
    assert r.devices[0].acks == 2
    (digests,) = rig.digests
    assert digests[0] == digests[1]


async def test_two_pairs_at_once(rig: InProcessRig) -> None:
    (p1, s1, d1), (p2, s2, d2) = await rig.pair(), await rig.pair()
    o = reconfigure_on_first_ack(rig.fw, {p1.name: s1})
    o.on_destinations_loaded = rig.digest_hook([(s1, d1), (s2, d2)]).on_destinations_loaded
    r = await migrate([p1, p2], o)
    check_completed(r)
    assert [(x.device, x.handling) for x in r.reinits] == [(p1.name, "ack re-armed")]
    assert [d.acks for d in r.devices] == [2, 1]
    assert len(rig.digests) == 2 and all(a == b for a, b in rig.digests)
    for p in (p1, p2):
        assert await rig.dst.get_state(p.destination_fd) == MigState.RUNNING


def test_switchover_ack_ignores_an_approval_from_before_a_rearm() -> None:
    """An INIT_DATA_SENT still in the stream when a REINIT re-arms the ack
    must not satisfy the new request."""
    ack = SwitchoverAck()
    g1 = ack.request("a")
    g2 = ack.request("a")  # REINIT before the destination processed g1's marker
    assert not ack.approve("a", g1) and not ack.all_acked
    assert ack.approve("a", g2) and ack.all_acked


async def test_verification_records_equal_digests(rig: InProcessRig) -> None:
    pair, s, d = await rig.pair()

    async def digests(_: DeviceMigration) -> tuple[str, str]:
        await asyncio.sleep(0.05)  # verification time: reported, not downtime
        return rig.fw.digest(s), rig.fw.digest(d)

    r = await migrate([pair], options(digests=digests))
    check_completed(r)
    assert r.verified
    assert r.hook_s >= 0.05 and r.downtime_s is not None
    assert r.downtime_s + r.hook_s <= r.phases["switchover"] + 1e-6
    (dev,) = r.devices
    assert dev.source_digest == dev.destination_digest != ""
    assert r.throughput_Bps > 0 and r.stop_copy_throughput_Bps > 0 and r.stop_copy_s > 0


@pytest.mark.parametrize("answer", [("a", "b"), ("", "")])
async def test_verification_mismatch_fails_loudly_and_restores_the_source(
    rig: InProcessRig, answer: tuple[str, str]
) -> None:
    """Unequal (or missing) digests fail the migration inside the stop: the
    source runs again and the destination is reset."""
    pair, _, _ = await rig.pair()

    async def digests(_: DeviceMigration) -> tuple[str, str]:
        return answer

    with pytest.raises(MigrationError, match="verification failed") as e:
        await migrate([pair], options(digests=digests))
    assert e.value.report is not None
    assert e.value.report.status == "failed" and not e.value.report.verified
    assert await rig.src.get_state(pair.source_fd) == MigState.RUNNING
    assert await rig.dst.get_state(pair.destination_fd) == MigState.RUNNING


@pytest.mark.parametrize("stream_depth", [1, 16])
async def test_a_destination_that_fails_to_load_fails_the_migration_without_hanging(
    rig: InProcessRig, stream_depth: int
) -> None:
    """The destination's write fails (LOAD_VHCA_STATE refused): the source
    must not wait forever on a full migration stream; it runs again and the
    destination is reset, and the pair migrates once the fault is gone."""
    pair, _, d = await rig.pair()
    rig.fw.inject_fault(d, Fault(FaultKind.FAIL, opcode=Opcode.LOAD_VHCA_STATE, count=1000))
    o = options(stream_depth=stream_depth)
    with pytest.raises(MigrationError, match=r"load failed|destination") as e:
        await asyncio.wait_for(migrate([pair], o), 30)
    assert e.value.report is not None and e.value.report.status == "failed"
    assert await rig.src.get_state(pair.source_fd) == MigState.RUNNING
    assert await rig.dst.get_state(pair.destination_fd) == MigState.RUNNING
    rig.fw.clear_faults(d)
    check_completed(await migrate([pair], options()))


@pytest.mark.parametrize("looks", ["nothing", "digests", "hook"])
async def test_the_destination_stops_only_for_what_looks_at_it_stopped(
    rig: InProcessRig, looks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's vm start takes a loaded destination from RESUMING to
    RUNNING_P2P, then RUNNING, in two ioctls (the kernel walks RESUMING ->
    STOP -> RUNNING_P2P).  The orchestrator does the same unless a digest or
    the on_destinations_loaded hook needs the destination stopped; either
    way the destination loads every image the source saved."""
    pair, s, d = await rig.pair()
    states: list[MigState] = []
    set_state = rig.dst.set_state

    async def recording(fd: int, state: MigState) -> int | None:
        if fd == pair.destination_fd:
            states.append(state)
        return await set_state(fd, state)

    monkeypatch.setattr(rig.dst, "set_state", recording)
    o = options()
    if looks == "digests":

        async def digests(_: DeviceMigration) -> tuple[str, str]:
            return rig.fw.digest(s), rig.fw.digest(d)

        o.digests = digests
    elif looks == "hook":
        o.on_destinations_loaded = rig.digest_hook([(s, d)]).on_destinations_loaded
    r = await migrate([pair], o)
    check_completed(r)
    stop = [] if looks == "nothing" else [MigState.STOP]
    assert states == [MigState.RESUMING, *stop, MigState.RUNNING_P2P, MigState.RUNNING]
    assert await rig.dst.get_state(pair.destination_fd) == MigState.RUNNING
    assert rig.fw.info(d).loaded_bytes == rig.fw.info(s).saved_bytes > 0
    assert r.verified == (looks == "digests")
    assert [a == b for a, b in rig.digests] == ([True] if looks == "hook" else [])
