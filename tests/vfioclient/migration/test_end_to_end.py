"""The orchestrator end to end, against the services as processes
(tests/support/vfioclient_e2e.py): `fwemu serve` with two
`vfio-driver serve --firmware` (three-process mode), and
`vfio-driver serve --scenario-service` (embedded firmware).  The test is the
client; reconfigurations, faults and digests go through the firmware's
Scenario service.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Iterator

import pytest

from driver.shards import pci_name
from driver.vfio.uapi import MigState
from fwemu.link.ifc import MiB, VfCaps
from tests.support.vfioclient_e2e import Pair, Rig, Topology, embedded, options, rig, three_process
from vfioclient.migration import DevicePair, MigrationError, MigrationReport, migrate

pytestmark = pytest.mark.grpc


@pytest.fixture(name="three", scope="module")
def three_fixture() -> Iterator[Topology]:
    with three_process() as t:
        yield t


@pytest.fixture(name="emb", scope="module")
def emb_fixture() -> Iterator[Topology]:
    with embedded() as t:
        yield t


@pytest.fixture(name="r3")
async def r3_fixture(three: Topology) -> AsyncIterator[Rig]:
    async with rig(three) as r:
        yield r


@pytest.fixture(name="re")
async def re_fixture(emb: Topology) -> AsyncIterator[Rig]:
    async with rig(emb) as r:
        yield r


def check_completed(r: MigrationReport) -> None:
    assert r.status == "completed" and r.error is None, r.error
    assert r.converged and r.iterations >= 1
    assert r.downtime_s is not None and 0 < r.downtime_s < r.total_s
    for d in r.devices:
        assert d.pre_copy and d.p2p and d.precopy_info_v2 and d.dma_logging
        assert d.precopy_bytes > 0 and d.stop_copy_bytes > 0
        assert d.acks >= 1


async def check_migrates_again(rg: Rig, p: Pair) -> None:
    """After a failed migration: the source was left RUNNING, the destination
    reset (RUNNING), and the same pair migrates with equal digests."""
    assert await rg.src.get_state(p.pair.source_fd) == MigState.RUNNING
    assert await rg.dst.get_state(p.pair.destination_fd) == MigState.RUNNING
    check_completed(await migrate([p.pair], rg.digest_hook([p])))
    (digests,) = rg.digests
    assert digests[0] == digests[1]


async def check_after_success(rg: Rig, pairs: list) -> None:  # type: ignore[type-arg]
    for p in pairs:
        assert await rg.dst.get_state(p.pair.destination_fd) == MigState.RUNNING
        assert await rg.src.get_state(p.pair.source_fd) == MigState.STOP


# --- 1. three processes --------------------------------------------------------------------


async def test_three_process_devices_per_driver(r3: Rig) -> None:
    """Each driver serves every VF of the shared firmware; the source fds are
    the source driver's, the destination fds the destination driver's."""
    (p,) = await r3.pairs(1)
    infos = {v.vhca_id: v for v in await r3.scenario.list_vfs()}
    for c in (r3.src, r3.dst):
        names = {d.name for d in await c.list_devices()}
        assert {
            pci_name(infos[p.src_vhca].function_id),
            pci_name(infos[p.dst_vhca].function_id),
        } <= names
    r = await migrate([p.pair], r3.digest_hook([p]))
    check_completed(r)
    assert r.reinits == []
    (digests,) = r3.digests
    assert digests[0] == digests[1]


# --- 2. REINIT timing ----------------------------------------------------------------------


async def test_reinit_before_the_first_ack(re: Rig) -> None:
    # 4 MiB and a 1 MiB buffer: iteration 1 cannot read all the initial bytes,
    # so no INIT_DATA_SENT (hence no ack) precedes the REINIT.
    (p,) = await re.pairs(1, size=4 * MiB)
    o = re.digest_hook([p])

    async def early(it: int) -> None:
        if it == 1:
            await re.scenario.reconfigure(p.src_vhca)

    o.on_iteration = early
    r = await migrate([p.pair], o)
    check_completed(r)
    (ev,) = r.reinits
    assert (ev.device, ev.phase, ev.handling) == (p.pair.name, "precopy", "ack re-armed")
    assert ev.iteration == 1 and ev.initial_bytes > 0
    (dev,) = r.devices
    assert dev.init_data_sent == 1 and dev.acks == 1
    assert dev.precopy_bytes - ev.precopy_bytes_before >= ev.initial_bytes
    (digests,) = re.digests
    assert digests[0] == digests[1]
    await check_after_success(re, [p])


@pytest.mark.parametrize("mode", ["three-process", "embedded"])
async def test_reinit_at_the_first_ack(mode: str, re: Rig, r3: Rig) -> None:
    rg = r3 if mode == "three-process" else re
    if mode == "three-process":
        assert rg.topo.source_driver != rg.topo.destination_driver
    (p,) = await rg.pairs(1)
    o = rg.digest_hook([p])
    done = rg.reconfigure_on_first_ack({p.pair.name: p.src_vhca}, o)
    r = await migrate([p.pair], o)
    check_completed(r)
    assert done == {p.pair.name}
    (ev,) = r.reinits
    assert (ev.device, ev.phase, ev.handling) == (p.pair.name, "precopy", "ack re-armed")
    assert ev.initial_bytes > 0
    (dev,) = r.devices
    # A second INIT_DATA_SENT for the new initial bytes, all read in precopy.
    assert dev.init_data_sent == 2 and 1 <= dev.acks <= 2
    assert dev.precopy_bytes - ev.precopy_bytes_before >= ev.initial_bytes
    (digests,) = rg.digests
    assert digests[0] == digests[1]
    await check_after_success(rg, [p])


async def test_reinit_after_the_switchover_decision_fails(re: Rig) -> None:
    (p,) = await re.pairs(1)
    decisions = 0

    async def decided() -> None:
        nonlocal decisions
        decisions += 1
        await re.scenario.reconfigure(p.src_vhca)

    with pytest.raises(MigrationError, match="after the switchover decision") as e:
        await migrate([p.pair], options(on_switchover_decision=decided))
    assert decisions == 1
    r = e.value.report
    assert r is not None and r.status == "failed"
    assert [(x.device, x.phase, x.handling) for x in r.reinits] == [
        (p.pair.name, "after-switchover-decision", "failed")
    ]
    await check_migrates_again(re, p)


# --- 3. no migration_state capability --------------------------------------------------------


@pytest.mark.parametrize("mode", ["embedded", "three-process"])
async def test_no_migration_state_cap_never_reinits(mode: str, re: Rig, r3: Rig) -> None:
    rg = re if mode == "embedded" else r3
    (p,) = await rg.pairs(1, caps=VfCaps(migration_state=False))
    o = rg.digest_hook([p])

    async def early(it: int) -> None:  # a reconfiguration before the ack too
        if it == 1:
            await rg.scenario.reconfigure(p.src_vhca)

    o.on_iteration = early
    done = rg.reconfigure_on_first_ack({p.pair.name: p.src_vhca}, o)
    r = await migrate([p.pair], o)
    check_completed(r)
    assert done == {p.pair.name}
    assert r.reinits == []
    (dev,) = r.devices
    assert dev.init_data_sent == 1 and dev.acks == 1
    (digests,) = rg.digests
    assert digests[0] == digests[1]  # the reconfigurations travelled as dirty data


# --- 4. no migration capability --------------------------------------------------------------


@pytest.mark.parametrize("cap", ["migration", "migratable"])
async def test_unmigratable_vf_is_listed_and_refused(cap: str, re: Rig) -> None:
    (bad,) = await re.create(1, caps=VfCaps(**{cap: False}))
    (good,) = await re.create(1)
    infos = {v.vhca_id: v for v in await re.scenario.list_vfs()}
    devs = {d.vhca_id: d for d in await re.src.list_devices()}
    assert not devs[bad].migratable and devs[bad].migration_flags == 0
    assert devs[good].migratable
    bfd = await re.src.open_device(pci_name(infos[bad].function_id))
    gfd = await re.dst.open_device(pci_name(infos[good].function_id))
    bad_name = pci_name(infos[bad].function_id)
    # The unmigratable VF as the source, then as the destination: refused at
    # discovery (GET MIGRATION is ENOTTY), before any state change.
    for pair in (
        DevicePair(re.src, bfd, re.dst, gfd, name="bad-src"),
        DevicePair(re.dst, gfd, re.src, bfd, name="bad-dst"),
    ):
        with pytest.raises(MigrationError) as e:
            await migrate([pair], options())
        r = e.value.report
        assert r is not None and r.status == "failed" and r.reinits == []
        assert r.iterations == 0 and "precopy" not in r.phases
        msg = str(e.value)
        # A clear error: the errno, the device's name, "does not support migration".
        assert "ENOTTY" in msg and bad_name in msg and "does not support migration" in msg, msg
        assert isinstance(e.value.__cause__, OSError)
        assert e.value.__cause__.errno == errno.ENOTTY
    assert await re.dst.get_state(gfd) == MigState.RUNNING


# --- 5. a firmware fault during precopy --------------------------------------------------------


async def test_save_fault_in_precopy_recovers(re: Rig) -> None:
    (p,) = await re.pairs(1, size=4 * MiB)
    injected: list[int] = []

    async def inject(it: int) -> None:
        if it == 2:
            injected.append(
                await re.scenario.inject_fault(
                    p.src_vhca,
                    "fail",
                    opcode="SAVE_VHCA_STATE",
                    status="INT_ERR",
                    in_completion=True,
                )
            )

    with pytest.raises(MigrationError) as e:
        await migrate([p.pair], options(on_iteration=inject))
    assert injected
    r = e.value.report
    assert r is not None and r.status == "failed" and r.error
    assert r.iterations >= 2, r.error
    # The SAVE failed in the firmware: the saving stream latched in error (ENODEV) or EIO.
    assert "ENODEV" in r.error or "EIO" in r.error, r.error
    await check_migrates_again(re, p)  # the fault was one-shot
    await check_after_success(re, [p])


# --- 6. eight devices at once -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["embedded", "three-process"])
async def test_eight_devices_at_once(mode: str, re: Rig, r3: Rig) -> None:
    rg = re if mode == "embedded" else r3
    pairs = await rg.pairs(8, size=1 * MiB)
    r = await migrate([p.pair for p in pairs], rg.digest_hook(pairs))
    check_completed(r)
    assert len(r.devices) == 8 and r.reinits == []
    assert len(rg.digests) == 8
    for p, (a, b) in zip(pairs, rg.digests, strict=True):
        assert a == b, p.pair.name
    await check_after_success(rg, pairs)
