"""FSM arcs -> firmware commands (mlx5vf_pci_step_device_state_locked,
reference §5.7), observed through the firmware: the commands mlx5vf sent (a
recording link), the VF's suspend flags, its tracking session and saved bytes."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from driver.vfio.uapi import MigState
from fwemu.link.ifc import CmdStatus, Fault, FaultKind, KiB, Opcode
from tests.support import mlx5 as h

S = MigState

pytestmark = pytest.mark.timeout(60)


async def suspend_flags(dev: Any) -> tuple[bool, bool]:
    vf = await dev.vf()
    return vf.initiator_suspended, vf.responder_suspended


async def test_p2p_arcs_use_the_asymmetric_suspend_resume_op_mods(mlx5: h.Factory) -> None:
    """§5.7 / §5.2: RUNNING->RUNNING_P2P = SUSPEND op_mod 0 (INITIATOR),
    RUNNING_P2P->STOP = SUSPEND op_mod 1 (RESPONDER), STOP->RUNNING_P2P =
    RESUME op_mod 0 (RESPONDER), RUNNING_P2P->RUNNING = RESUME op_mod 1
    (INITIATOR): one command per arc, and the VF moves accordingly."""
    env = await mlx5()
    dev = await env.device()
    expect = [
        (S.RUNNING_P2P, ("SUSPEND", 0), (True, False)),
        (S.STOP, ("SUSPEND", 1), (True, True)),
        (S.RUNNING_P2P, ("RESUME", 0), (True, False)),
        (S.RUNNING, ("RESUME", 1), (False, False)),
    ]
    for target, cmd, flags in expect:
        mark = dev.mark()
        assert await dev.set_state(target) is None
        sent = dev.cmds(mark)
        assert [c.brief for c in sent] == [cmd], target
        assert sent[0].result.ok
        assert await suspend_flags(dev) == flags, target
        assert await dev.get_state() == target


async def test_running_to_stop_passes_running_p2p(mlx5: h.Factory) -> None:
    """§1.3: RUNNING -> STOP is two arcs on a P2P device (SUSPEND 0 then 1), and
    STOP -> RUNNING two more (RESUME 0 then 1)."""
    env = await mlx5()
    dev = await env.device()
    mark = dev.mark()
    await dev.set_state(S.STOP)
    await dev.set_state(S.RUNNING)
    assert [c.brief for c in dev.cmds(mark)] == [
        ("SUSPEND", 0),
        ("SUSPEND", 1),
        ("RESUME", 0),
        ("RESUME", 1),
    ]
    t = dev.mvdev.stats.transitions
    assert t[("RUNNING", "RUNNING_P2P")] == 1 and t[("RUNNING_P2P", "STOP")] == 1
    assert t[("STOP", "RUNNING_P2P")] == 1 and t[("RUNNING_P2P", "RUNNING")] == 1


async def test_stop_to_stop_copy_queries_then_saves_untracked_full(mlx5: h.Factory) -> None:
    """§5.7: STOP->STOP_COPY = QUERY(non-incremental), then SAVE(inc 0, track 0)
    into buf[0] sized to the query (non-chunk: no headroom); a new saving fd.
    STOP_COPY->STOP sends nothing and ends the file."""
    env = await mlx5()
    dev = await env.device(h.vf_config(96 * KiB))
    await dev.set_state(S.STOP)
    mark = dev.mark()
    f = await dev.set_state(S.STOP_COPY)
    assert f is not None
    sent = dev.cmds(mark)
    assert [c.brief for c in sent] == [("QUERY", 0), ("SAVE", 0, 0)]
    required = sent[0].result.required_umem_size
    assert required > 96 * KiB
    assert sent[1].args["size"] == h.pages(required)
    stream = await h.read_to_eof(env, f)
    assert sent[1].completion is not None and sent[1].completion.status == 0
    assert sent[1].completion.actual_image_size == required
    assert len(stream) == 24 + 16 + required
    vf = await dev.vf()
    assert vf.saved_bytes == required and not vf.tracking

    mark = dev.mark()
    assert await dev.set_state(S.STOP) is None
    assert dev.cmds(mark) == []
    assert dev.mvdev.saving_migf is None
    with h.raises_errno(errno.ENODEV):
        await f.read(1)


async def test_running_to_pre_copy_starts_tracking_with_headroom(mlx5: h.Factory) -> None:
    """§5.7 / §5.6: RUNNING->PRE_COPY = QUERY(non-inc), then SAVE(inc 0, track 1)
    into a buffer of buf[0]'s size, which non-chunk tracking sizes with 10%
    headroom; the VF keeps running and its firmware tracking session starts."""
    env = await mlx5()
    dev = await env.device(h.vf_config(128 * KiB, dirty=256 * KiB))
    mark = dev.mark()
    f = await dev.set_state(S.PRE_COPY)
    assert f is not None
    await env.settle(dev)
    sent = dev.cmds(mark)
    assert [c.brief for c in sent] == [("QUERY", 0), ("SAVE", 0, 1)]
    required = sent[0].result.required_umem_size
    assert sent[1].args["size"] == h.pages(required + required // 10)
    assert sent[1].completion is not None and sent[1].completion.status == 0
    vf = await dev.vf()
    assert vf.tracking
    assert (vf.initiator_suspended, vf.responder_suspended) == (False, False)
    assert vf.saved_bytes == sent[1].completion.actual_image_size


async def test_pre_copy_p2p_round_trip_keeps_the_file(mlx5: h.Factory) -> None:
    """§5.7 / §1.4: PRE_COPY->PRE_COPY_P2P = SUSPEND op_mod 0, PRE_COPY_P2P->PRE_COPY
    = RESUME op_mod 1; no fd is returned (data_fd -1), the same saving file
    and the tracking session continue."""
    env = await mlx5()
    dev = await env.device()
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    migf = dev.saving_migf
    mark = dev.mark()
    assert await dev.set_state_raw(S.PRE_COPY_P2P) == (S.PRE_COPY_P2P, -1)
    assert [c.brief for c in dev.cmds(mark)] == [("SUSPEND", 0)]
    assert await suspend_flags(dev) == (True, False)
    mark = dev.mark()
    assert await dev.set_state_raw(S.PRE_COPY) == (S.PRE_COPY, -1)
    assert [c.brief for c in dev.cmds(mark)] == [("RESUME", 1)]
    assert await suspend_flags(dev) == (False, False)
    assert dev.saving_migf is migf is f
    assert (await dev.vf()).tracking


async def test_pre_copy_p2p_to_stop_copy_suspends_responder_then_saves_final_incremental(
    mlx5: h.Factory,
) -> None:
    """§5.7: PRE_COPY_P2P->STOP_COPY = SUSPEND op_mod 1 (RESPONDER), QUERY(INC|FINAL)
    (incremental), SAVE(inc 1, track 0) into buf[0]; the same fd continues to
    the end of the stream, and the final SAVE ends the tracking session."""
    env = await mlx5()
    dev = await env.device(h.vf_config(dirty=512 * KiB))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await h.precopy_info(f)
    await h.read_available(f)
    await dev.set_state(S.PRE_COPY_P2P)
    mark = dev.mark()
    assert await dev.set_state_raw(S.STOP_COPY) == (S.STOP_COPY, -1)
    sent = dev.cmds(mark)
    assert [c.brief for c in sent] == [("SUSPEND", 1), ("QUERY", 1), ("SAVE", 1, 0)]
    assert await suspend_flags(dev) == (True, True)
    tail = await h.read_to_eof(env, f)
    assert sent[2].completion is not None and sent[2].completion.status == 0
    assert len(tail) == 16 + sent[2].completion.actual_image_size
    assert not (await dev.vf()).tracking


@pytest.mark.parametrize(
    ("start", "end"),
    [(S.PRE_COPY, S.RUNNING), (S.PRE_COPY_P2P, S.RUNNING_P2P)],
    ids=["PRE_COPY->RUNNING", "PRE_COPY_P2P->RUNNING_P2P"],
)
async def test_leaving_pre_copy_sends_the_cleanup_save(mlx5: h.Factory, start: S, end: S) -> None:
    """§5.7: PRE_COPY->RUNNING and PRE_COPY_P2P->RUNNING_P2P are the pre-copy
    cleanup: QUERY(INC|CLEANUP) (incremental) then SAVE(inc 0, track 0) whose
    data is discarded; the firmware ends tracking, the arc succeeds, the
    saving file ends (reads: ENODEV)."""
    env = await mlx5()
    dev = await env.device(h.vf_config(dirty=256 * KiB))
    f = await dev.walk(S.PRE_COPY, start)
    await env.settle(dev)
    assert (await dev.vf()).tracking
    mark = dev.mark()
    assert await dev.set_state(end) is None
    sent = dev.cmds(mark)
    assert [c.brief for c in sent] == [("QUERY", 1), ("SAVE", 0, 0)]
    assert sent[1].completion is not None  # disable_fds waited for it
    assert sent[1].completion.status == 0 and sent[1].completion.actual_image_size == 0
    assert not (await dev.vf()).tracking
    assert dev.mvdev.saving_migf is None
    assert await dev.get_state() == end
    with h.raises_errno(errno.ENODEV):
        await f.read(1)
    # The device migrates again from here.
    f2 = await dev.walk(S.RUNNING, S.PRE_COPY)
    assert f2 is not None and f2 is not f


async def test_cleanup_save_failing_in_completion_fails_the_arc_with_eio(mlx5: h.Factory) -> None:
    """§5.7: the cleanup arc returns -EIO when the saving file ended in ERROR,
    i.e. the cleanup SAVE completed with a failure other than BAD_RES_STATE
    (§5.5: -> ERROR).  The file is gone (disable_fds ran) and the device stays
    at PRE_COPY (a failed arc does not move it, §1.3); a reset recovers."""
    env = await mlx5()
    dev = await env.device()
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await env.inject(
        dev,
        Fault(FaultKind.FAIL, Opcode.SAVE_VHCA_STATE, CmdStatus.INT_ERR, in_completion=True),
    )
    mark = dev.mark()
    with h.raises_errno(errno.EIO):
        await dev.set_state(S.RUNNING)
    sent = dev.cmds(mark)
    assert [c.brief for c in sent] == [("QUERY", 1), ("SAVE", 0, 0)]
    assert sent[1].completion is not None and sent[1].completion.status == CmdStatus.INT_ERR
    assert dev.mvdev.saving_migf is None
    assert await dev.get_state() == S.PRE_COPY
    with h.raises_errno(errno.ENODEV):
        await f.read(1)
    await dev.core.reset()
    assert await dev.get_state() == S.RUNNING
    vf = await dev.vf()
    assert not vf.tracking and (vf.initiator_suspended, vf.responder_suspended) == (False, False)


async def test_cleanup_save_failing_with_bad_res_state_still_succeeds(mlx5: h.Factory) -> None:
    """§5.5: a failed non-stop-copy SAVE with BAD_RES_STATE puts the file in
    PRE_COPY_ERROR, not ERROR, so the cleanup arc still succeeds."""
    env = await mlx5()
    dev = await env.device()
    await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await env.inject(
        dev,
        Fault(
            FaultKind.FAIL,
            Opcode.SAVE_VHCA_STATE,
            CmdStatus.BAD_RES_STATE_ERR,
            in_completion=True,
        ),
    )
    assert await dev.set_state(S.RUNNING) is None
    assert await dev.get_state() == S.RUNNING


async def test_leaving_pre_copy_with_the_file_already_in_error_fails_enodev(
    mlx5: h.Factory,
) -> None:
    """§5.4 / §5.7: with the saving file already in ERROR (an incremental SAVE
    failed), the cleanup's QUERY(INC|CLEANUP) is blocked with -ENODEV before any
    command is sent, so PRE_COPY->RUNNING fails with ENODEV (not EIO: the EIO
    of §5.7 is for a file that ends in ERROR during the cleanup SAVE) and the
    device stays at PRE_COPY with the file in place."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await h.precopy_with_dirt(env, dev, 0.05)
    await env.inject(
        dev,
        Fault(FaultKind.FAIL, Opcode.SAVE_VHCA_STATE, CmdStatus.INT_ERR, in_completion=True),
    )
    await h.precopy_info(f)  # issues the incremental SAVE, which fails
    await env.settle(dev)
    assert dev.saving_migf.state.name == "ERROR"
    mark = dev.mark()
    with h.raises_errno(errno.ENODEV):
        await dev.set_state(S.RUNNING)
    assert dev.cmds(mark) == []
    assert await dev.get_state() == S.PRE_COPY
    assert dev.mvdev.saving_migf is f


async def test_resuming_arcs_send_no_firmware_command(mlx5: h.Factory) -> None:
    """§5.7: STOP->RESUMING makes a new resuming file and RESUMING->STOP only
    disables the fds: neither sends a command (LOADs happen inside write())."""
    env = await mlx5()
    dev = await env.device()
    await dev.set_state(S.STOP)
    mark = dev.mark()
    f = await dev.set_state(S.RESUMING)
    assert f is not None and dev.mvdev.resuming_migf is f
    assert await dev.set_state(S.STOP) is None
    assert dev.cmds(mark) == []
    assert dev.mvdev.resuming_migf is None
    with h.raises_errno(errno.ENODEV):
        await f.write(b"x")


async def test_typical_source_and_destination_command_sequences(mlx5: h.Factory) -> None:
    """§5.7 "Typical source with PRE_COPY" and "Destination", command by command."""
    env = await mlx5()
    src, dst = await env.devices(2, h.vf_config(dirty=0))
    mark = src.mark()
    f = await src.set_state(S.PRE_COPY)
    await env.settle(src)
    await h.precopy_info(f)
    stream = await h.read_available(f)
    await src.set_state(S.PRE_COPY_P2P)
    await src.set_state(S.STOP_COPY)
    stream += await h.read_to_eof(env, f)
    await src.set_state(S.STOP)
    assert [c.brief for c in src.cmds(mark)] == [
        ("QUERY", 0),
        ("SAVE", 0, 1),
        ("QUERY", 1),  # GET_PRECOPY_INFO in PRE_COPY (nothing dirty: no SAVE)
        ("SUSPEND", 0),
        ("SUSPEND", 1),
        ("QUERY", 1),
        ("SAVE", 1, 0),
    ]

    mark = dst.mark()
    await dst.set_state(S.STOP)
    rf = await dst.set_state(S.RESUMING)
    await h.write_all(rf, stream)
    await dst.set_state(S.STOP)
    await dst.set_state(S.RUNNING)
    assert [c.brief for c in dst.cmds(mark)] == [
        ("SUSPEND", 0),
        ("SUSPEND", 1),
        ("LOAD",),
        ("LOAD",),
        ("RESUME", 0),
        ("RESUME", 1),
    ]
    assert all(c.result.ok for c in dst.cmds(mark))


async def test_failed_arc_leaves_the_device_at_the_last_state_reached(mlx5: h.Factory) -> None:
    """§1.3: on an error the device stays at the last state it reached; §5.2:
    a failed synchronous command is the status's errno (INT_ERR -> EIO,
    BAD_RES_STATE -> EINVAL).  The SET copies data_fd = -1 back."""
    env = await mlx5()
    dev = await env.device()
    await env.inject(dev, Fault(FaultKind.FAIL, Opcode.SUSPEND_VHCA, CmdStatus.INT_ERR, count=1))
    await env.inject(
        dev, Fault(FaultKind.FAIL, Opcode.RESUME_VHCA, CmdStatus.BAD_RES_STATE_ERR, count=1)
    )
    data = bytearray(8)
    data[:4] = int(S.STOP).to_bytes(4, "little")
    with h.raises_errno(errno.EIO):
        await dev.set_state_raw(S.STOP, data)
    assert int.from_bytes(data[4:], "little", signed=True) == -1
    assert await dev.get_state() == S.RUNNING  # the first arc's SUSPEND failed
    await dev.set_state(S.STOP)  # the fault was used up
    with h.raises_errno(errno.EINVAL):
        await dev.set_state(S.RUNNING)
    assert await dev.get_state() == S.STOP
    await dev.set_state(S.RUNNING)
    assert await suspend_flags(dev) == (False, False)


async def test_suspend_waits_for_the_save_in_flight(mlx5: h.Factory) -> None:
    """§5.7: PRE_COPY->PRE_COPY_P2P waits for no SAVE in flight before SUSPEND
    (the firmware would refuse it with RES_BUSY); held on a virtual clock, the
    SUSPEND is sent only once the SAVE completed."""
    env = await mlx5("virtual")
    dev = await env.device()
    await dev.set_state(S.PRE_COPY, drive=False)  # its SAVE stays in flight
    assert (await dev.vf()).save_in_flight
    mark = dev.mark()
    task = asyncio.ensure_future(dev.set_state(S.PRE_COPY_P2P, drive=False))
    await asyncio.sleep(0.05)
    assert not task.done()
    assert dev.cmds(mark) == []
    await env.advance(0)
    await asyncio.wait_for(task, 5)
    sent = dev.cmds(mark)
    assert [c.brief for c in sent] == [("SUSPEND", 0)] and sent[0].result.ok


async def test_multi_arc_requests_return_the_fd_of_the_last_arc(mlx5: h.Factory) -> None:
    """§1.3/§1.4: one SET walks several arcs; only the last may make a data
    file.  RUNNING -> STOP_COPY = SUSPEND 0, SUSPEND 1, QUERY, SAVE(0, 0) and a
    new fd; RUNNING -> PRE_COPY_P2P = SUSPEND 0, then the saving file of
    RUNNING_P2P -> PRE_COPY_P2P (tracking starts on the initiator-suspended VF);
    PRE_COPY -> STOP_COPY passes PRE_COPY_P2P and returns no fd (data_fd -1)."""
    env = await mlx5()
    a, b = await env.devices(2)
    mark = a.mark()
    st, fd = await a.set_state_raw(S.STOP_COPY)
    assert (st, fd) == (S.STOP_COPY, 0)
    assert [c.brief for c in a.cmds(mark)] == [
        ("SUSPEND", 0),
        ("SUSPEND", 1),
        ("QUERY", 0),
        ("SAVE", 0, 0),
    ]
    assert len(await h.read_to_eof(env, a.files[0])) > 64 * KiB

    mark = b.mark()
    st, fd = await b.set_state_raw(S.PRE_COPY_P2P)
    assert (st, fd) == (S.PRE_COPY_P2P, 0)
    assert [c.brief for c in b.cmds(mark)] == [("SUSPEND", 0), ("QUERY", 0), ("SAVE", 0, 1)]
    await env.settle(b)
    assert (await b.vf()).tracking
    await b.set_state(S.PRE_COPY)
    mark = b.mark()
    assert await b.set_state_raw(S.STOP_COPY) == (S.STOP_COPY, -1)
    assert [c.brief for c in b.cmds(mark)] == [
        ("SUSPEND", 0),
        ("SUSPEND", 1),
        ("QUERY", 1),
        ("SAVE", 1, 0),
    ]
    stream = await h.read_to_eof(env, b.files[0])
    assert stream[:4] == (8).to_bytes(4, "little")
