"""Injected faults: per VF, consumed in order, then gone."""

from __future__ import annotations

import asyncio

import pytest

from fwemu.link import LinkError
from fwemu.link.ifc import CmdStatus, Fault, FaultKind, KiB, Opcode, QueryVhcaMigState, Syndrome

BAD_SYS_STATE = CmdStatus.BAD_SYS_STATE_ERR
ODD_SYNDROME = 0x1234_5678


class Bench:
    """A VF with everything in place so that each migration command succeeds."""

    def __init__(self, h) -> None:
        self.h = h

    async def setup(self) -> None:
        h = self.h
        other = await h.vf(size=64 * KiB)
        await h.suspend_fully(other)
        self.image = await h.save_ok(other, (await h.query(other)).required_umem_size)
        self.vhca = await h.vf(size=64 * KiB, dirty_bytes_per_s=0)
        self.size = (await h.query(self.vhca)).required_umem_size

    async def prepare(self, opcode: int) -> None:
        """Bring the VF into the state where `opcode` succeeds."""
        if opcode == Opcode.RESUME_VHCA:
            assert (await self.h.suspend(self.vhca, 0)).ok
        elif opcode == Opcode.LOAD_VHCA_STATE:
            await self.h.suspend_fully(self.vhca)

    async def issue(self, opcode: int):
        h, v = self.h, self.vhca
        if opcode == Opcode.SUSPEND_VHCA:
            return await h.suspend(v, 0)
        if opcode == Opcode.RESUME_VHCA:
            return await h.resume(v, 1)
        if opcode == Opcode.QUERY_VHCA_MIGRATION_STATE:
            return await h.query(v)
        if opcode == Opcode.SAVE_VHCA_STATE:
            pending = await h.save(v, self.size, set_track=True)
            if pending.accepted.ok:
                await h.advance(0)
                assert (await h.completion(pending)).status == 0
            return pending.accepted
        assert opcode == Opcode.LOAD_VHCA_STATE
        return await h.load(v, self.image)


COMMANDS = [
    Opcode.SUSPEND_VHCA,
    Opcode.RESUME_VHCA,
    Opcode.QUERY_VHCA_MIGRATION_STATE,
    Opcode.SAVE_VHCA_STATE,
    Opcode.LOAD_VHCA_STATE,
]


@pytest.mark.parametrize("opcode", COMMANDS, ids=lambda o: Opcode(o).name)
async def test_fail_fault_fails_the_next_command_with_its_status_then_stops(h, opcode):
    """FAIL: the next command of that opcode answers exactly the injected status
    and syndrome (and does nothing); the one after it succeeds."""
    bench = Bench(h)
    await bench.setup()
    await bench.prepare(opcode)
    fault_id = await h.link.inject_fault(
        bench.vhca,
        Fault(FaultKind.FAIL, opcode=opcode, status=BAD_SYS_STATE, syndrome=ODD_SYNDROME),
    )
    assert fault_id > 0
    before = await h.info(bench.vhca)
    res = await bench.issue(opcode)
    assert (res.status, res.syndrome) == (BAD_SYS_STATE, ODD_SYNDROME)
    after = await h.info(bench.vhca)
    assert (after.initiator_suspended, after.responder_suspended, after.tracking) == (
        before.initiator_suspended,
        before.responder_suspended,
        before.tracking,
    )
    assert (await bench.issue(opcode)).status == CmdStatus.OK
    assert await h.link.clear_faults(bench.vhca) == 0  # consumed


async def test_fail_fault_only_hits_its_own_opcode_and_vf(h):
    """Faults are per VF and a FAIL fault is per opcode."""
    bench = Bench(h)
    await bench.setup()
    sibling = await h.vf(size=64 * KiB)
    await h.link.inject_fault(
        bench.vhca, Fault(FaultKind.FAIL, opcode=Opcode.SUSPEND_VHCA, status=BAD_SYS_STATE)
    )
    assert (await h.query(bench.vhca)).ok
    assert (await h.suspend(sibling, 0)).ok
    assert (await h.suspend(bench.vhca, 0)).status == BAD_SYS_STATE


async def test_fail_fault_with_count_hits_that_many_commands(h):
    """A FAIL fault with count N fails the next N commands of its opcode."""
    vhca = await h.vf(size=64 * KiB)
    await h.link.inject_fault(
        vhca,
        Fault(FaultKind.FAIL, opcode=Opcode.QUERY_VHCA_MIGRATION_STATE, status=0x7, count=3),
    )
    statuses = [(await h.query(vhca)).status for _ in range(4)]
    assert statuses == [CmdStatus.NOT_READY] * 3 + [CmdStatus.OK]


async def test_faults_are_consumed_in_the_order_they_were_injected(h):
    """README: faults are consumed in order."""
    vhca = await h.vf(size=64 * KiB)
    for status in (0x4, 0x7):
        await h.link.inject_fault(
            vhca, Fault(FaultKind.FAIL, opcode=Opcode.QUERY_VHCA_MIGRATION_STATE, status=status)
        )
    assert [(await h.query(vhca)).status for _ in range(3)] == [0x4, 0x7, 0]


async def test_save_fail_in_completion_is_accepted_and_completes_with_the_status(h):
    """A SAVE FAIL fault `in_completion`: the command is accepted (status 0), its
    completion carries the status and syndrome and no image."""
    vhca = await h.vf(size=64 * KiB)
    await h.link.inject_fault(
        vhca,
        Fault(
            FaultKind.FAIL,
            opcode=Opcode.SAVE_VHCA_STATE,
            status=CmdStatus.BAD_RES_STATE_ERR,
            syndrome=ODD_SYNDROME,
            in_completion=True,
        ),
    )
    size = (await h.query(vhca)).required_umem_size
    pending = await h.save(vhca, size, set_track=True)
    assert pending.accepted.status == CmdStatus.OK, pending.accepted
    await h.advance(0)
    c = await h.completion(pending)
    assert (c.status, c.syndrome, c.actual_image_size) == (0x9, ODD_SYNDROME, 0)
    assert (await h.info(vhca)).tracking is False  # the SAVE did not happen
    c, _ = await h.save_done(vhca, size, set_track=True)
    assert c.status == 0


async def test_drop_completion_never_completes_and_the_vf_takes_a_new_save_after(h):
    """DROP_COMPLETION: the SAVE is accepted but its completion never arrives;
    after the completion time the VF accepts a new SAVE (before it: RES_BUSY)."""
    vhca = await h.vf(size=64 * KiB, save_latency_s=0.5)
    await h.link.inject_fault(vhca, Fault(FaultKind.DROP_COMPLETION))
    size = (await h.query(vhca)).required_umem_size
    dropped = await h.save(vhca, size, set_track=True)
    assert dropped.accepted.ok
    await h.advance(0.4)
    busy = await h.save(vhca, size, incremental=True, set_track=True)
    assert busy.accepted.status == CmdStatus.RES_BUSY
    await h.advance(0.2)
    assert (await h.info(vhca)).save_in_flight is False
    nxt = await h.save(vhca, size, incremental=True, set_track=True)
    assert nxt.accepted.ok, nxt.accepted
    await h.advance(0.5)
    assert (await h.completion(nxt)).status == 0
    await h.advance(10)
    await h.barrier()
    assert dropped.completions == []
    assert not dropped.future.done()


async def test_delay_completion_adds_its_delay(h):
    """DELAY_COMPLETION: the completion arrives delay_s later than it would."""
    vhca = await h.vf(size=64 * KiB, save_latency_s=0.1)
    await h.link.inject_fault(vhca, Fault(FaultKind.DELAY_COMPLETION, delay_s=0.5))
    t0 = await h.link.now()
    pending = await h.save(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    assert pending.accepted.ok
    await h.advance(0.55)
    assert (await h.info(vhca)).save_in_flight is True
    await h.advance(0.1)
    c = await h.completion(pending)
    assert c.status == 0
    assert c.timestamp == pytest.approx(t0 + 0.6, abs=1e-6)


async def test_tracking_lost_fails_the_next_incremental_save_in_its_completion(h):
    """TRACKING_LOST: the next incremental tracked SAVE is accepted and completes
    with BAD_RES_STATE (0x9) / TRACKING_LOST (mlx5vf's PRE_COPY_ERROR path); then
    incremental SAVEs are refused at once with BAD_RES_STATE, incremental queries
    report the full size, and a full final SAVE on the suspended VF works."""
    vhca = await h.vf(size=128 * KiB, dirty_bytes_per_s=64 * KiB)
    full = (await h.query(vhca)).required_umem_size
    await h.save_ok(vhca, full, set_track=True)
    await h.link.inject_fault(vhca, Fault(FaultKind.TRACKING_LOST))
    # A non-incremental command does not consume it.
    assert (await h.query(vhca)).ok
    await h.advance(0.3)
    q = await h.query(vhca, incremental=True)
    assert q.migration_state == QueryVhcaMigState.OPER_MIGRATION_DIRTY
    pending = await h.save(vhca, q.required_umem_size, incremental=True, set_track=True)
    assert pending.accepted.status == CmdStatus.OK
    await h.advance(0)
    c = await h.completion(pending)
    assert (c.status, c.syndrome) == (0x9, Syndrome.TRACKING_LOST)
    assert c.actual_image_size == 0
    for track in (True, False):
        refused = await h.save(vhca, full, incremental=True, set_track=track)
        assert refused.accepted.status == CmdStatus.BAD_RES_STATE_ERR, refused.accepted
    q = await h.query(vhca, incremental=True)
    assert q.required_umem_size == (await h.query(vhca)).required_umem_size
    assert q.migration_state == QueryVhcaMigState.UNINITIALIZED
    await h.suspend_fully(vhca)
    refused = await h.save(vhca, full, incremental=True)
    assert refused.accepted.status == CmdStatus.BAD_RES_STATE_ERR
    img = await h.save_ok(vhca, (await h.query(vhca)).required_umem_size)
    assert img[:4] == b"VHCA"


async def test_clear_faults_disarms_everything(h):
    """clear_faults disarms every armed fault of the VF and says how many."""
    vhca = await h.vf(size=64 * KiB)
    await h.link.inject_fault(
        vhca, Fault(FaultKind.FAIL, opcode=Opcode.QUERY_VHCA_MIGRATION_STATE, status=0x4)
    )
    await h.link.inject_fault(vhca, Fault(FaultKind.DROP_COMPLETION))
    await h.link.inject_fault(vhca, Fault(FaultKind.TRACKING_LOST))
    assert await h.link.clear_faults(vhca) == 3
    assert (await h.query(vhca)).ok
    c, _ = await h.save_done(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    assert c.status == 0
    assert await h.link.clear_faults(vhca) == 0


async def test_delay_fault_answers_later_with_the_real_result(h):
    """DELAY: the command's answer comes delay_s later on the firmware clock
    (here a virtual one: only once it is advanced), unchanged."""
    vhca = await h.vf(size=64 * KiB)
    await h.link.inject_fault(
        vhca, Fault(FaultKind.DELAY, opcode=Opcode.SUSPEND_VHCA, delay_s=0.05)
    )
    answer = asyncio.ensure_future(h.suspend(vhca, 0))
    await asyncio.sleep(0.1)
    assert not answer.done()
    await h.advance(0.049)
    await asyncio.sleep(0.05)
    assert not answer.done()
    await h.advance(0.002)
    res = await asyncio.wait_for(answer, 5)
    assert res.ok
    assert (await h.info(vhca)).initiator_suspended is True


@pytest.mark.parametrize(
    "fault",
    [
        Fault(FaultKind.FAIL, opcode=Opcode.QUERY_HCA_CAP),
        Fault(FaultKind.FAIL, opcode=Opcode.SUSPEND_VHCA, status=0),
        Fault(FaultKind.FAIL, opcode=Opcode.SUSPEND_VHCA, status=0x100),
        Fault(FaultKind.DELAY, opcode=Opcode.SUSPEND_VHCA, delay_s=0),
        Fault(FaultKind.DELAY_COMPLETION, delay_s=0),
        Fault(FaultKind.FAIL, opcode=Opcode.LOAD_VHCA_STATE, in_completion=True),
    ],
    ids=[
        "not-a-migration-opcode",
        "status-0",
        "status-9-bits",
        "delay-0",
        "delay-completion-0",
        "in-completion-not-save",
    ],
)
async def test_invalid_fault_is_refused_with_link_error(h, fault):
    """A fault that cannot apply (not a migration opcode, status 0 or wider than 8 bits, a delay of
    0, in_completion outside SAVE FAIL) is refused with LinkError."""
    vhca = await h.vf(size=64 * KiB)
    with pytest.raises(LinkError):
        await h.link.inject_fault(vhca, fault)
    assert await h.link.clear_faults(vhca) == 0


async def test_fault_on_an_unknown_vf_is_refused(h):
    """A scenario request for a VF that does not exist raises LinkError naming it."""
    with pytest.raises(LinkError, match="vhca_id"):
        await h.link.inject_fault(42, Fault(FaultKind.TRACKING_LOST))
