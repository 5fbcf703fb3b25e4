"""Errors latch on the saving side (reference §5.10), VFIO_DEVICE_RESET and
close (§5.7, §1.4), MIG_DATA_SIZE (§2, §5.7), and bad input that must neither
crash nor hang."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from driver.mlx5.cmd import MigfState
from driver.vfio.uapi import MIG_DATA_SIZE, MIG_STATE, Feature, MigState
from fwemu.link.ifc import CmdStatus, Fault, FaultKind, KiB, Opcode
from tests.support import mlx5 as h

S = MigState

pytestmark = pytest.mark.timeout(60)


def fail(opcode: int, status: int = CmdStatus.INT_ERR, **kw: Any) -> Fault:
    return Fault(FaultKind.FAIL, opcode, status, **kw)


async def assert_file_dead(f: Any) -> None:
    """Reads get ENODEV, blocking or not, and nothing waits."""
    for nonblock in (True, False):
        with h.raises_errno(errno.ENODEV):
            await asyncio.wait_for(f.read(16, nonblock=nonblock), 2)


async def vf_runs(dev: h.Dev) -> bool:
    vf = await dev.vf()
    return not vf.initiator_suspended and not vf.responder_suspended


# --------------------------------------------------------------------------------------
# errors latch
# --------------------------------------------------------------------------------------


async def test_refused_precopy_save_fails_the_ioctl_and_latches_error(mlx5: h.Factory) -> None:
    """§5.8/§5.10: when GET_PRECOPY_INFO's SAVE cannot be issued the ioctl fails
    with its errno (BAD_PARAM -> EINVAL) and the file is marked ERROR: reads
    and later ioctls get ENODEV."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await h.precopy_with_dirt(env, dev)
    await env.inject(dev, fail(Opcode.SAVE_VHCA_STATE, CmdStatus.BAD_PARAM_ERR))
    with h.raises_errno(errno.EINVAL):
        await h.precopy_info(f)
    assert dev.saving_migf.state == MigfState.ERROR
    assert not dev.saving_migf.save_comp.locked()  # the semaphore was given back
    await assert_file_dead(f)
    with h.raises_errno(errno.ENODEV):
        await h.precopy_info(f)


async def test_precopy_save_failing_in_completion_latches_error(mlx5: h.Factory) -> None:
    """§5.5: a tracked SAVE completing with a failure other than BAD_RES_STATE
    puts the file in ERROR (reads ENODEV), even with bytes still queued."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await f.read(10)
    await env.advance(0.02)
    await env.inject(dev, fail(Opcode.SAVE_VHCA_STATE, CmdStatus.LIM_ERR, in_completion=True))
    await dev.set_state(S.PRE_COPY_P2P)  # no SAVE issued: still fine
    await dev.set_state(S.PRE_COPY)
    await h.read_available(f)
    await h.precopy_info(f)  # issues the SAVE
    await env.settle(dev)
    assert dev.saving_migf.state == MigfState.ERROR
    await assert_file_dead(f)


async def test_first_tracked_save_failing_latches_error(mlx5: h.Factory) -> None:
    """§5.5: the initial PRE_COPY SAVE failing (INT_ERR) -> ERROR: the 24-byte
    record already queued is not readable any more."""
    env = await mlx5("virtual")
    dev = await env.device()
    await env.inject(dev, fail(Opcode.SAVE_VHCA_STATE, in_completion=True))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    assert dev.saving_migf.state == MigfState.ERROR
    await assert_file_dead(f)
    with h.raises_errno(errno.ENODEV):
        await h.precopy_info(f)


@pytest.mark.parametrize("opcode", [Opcode.QUERY_VHCA_MIGRATION_STATE, Opcode.SAVE_VHCA_STATE])
async def test_failure_entering_stop_copy_latches_error(mlx5: h.Factory, opcode: int) -> None:
    """§5.7: PRE_COPY_P2P->STOP_COPY: a failed QUERY or refused SAVE fails the
    arc (INT_ERR -> EIO) and marks the file ERROR; the device stays at
    PRE_COPY_P2P (the responder SUSPEND already happened); a reset recovers."""
    env = await mlx5()
    dev = await env.device()
    f = await dev.walk(S.PRE_COPY, S.PRE_COPY_P2P)
    await h.read_available(f)
    await env.inject(dev, fail(opcode))
    with h.raises_errno(errno.EIO):
        await dev.set_state(S.STOP_COPY)
    assert await dev.get_state() == S.PRE_COPY_P2P
    assert dev.saving_migf.state == MigfState.ERROR
    await assert_file_dead(f)
    vf = await dev.vf()
    assert vf.initiator_suspended and vf.responder_suspended
    await dev.core.reset()
    assert await dev.get_state() == S.RUNNING and await vf_runs(dev)


async def test_stop_copy_on_a_file_already_in_error_is_enodev(mlx5: h.Factory) -> None:
    """§5.7: PRE_COPY_P2P->STOP_COPY with the file already in ERROR: after the
    SUSPEND, -ENODEV without a QUERY or SAVE."""
    env = await mlx5("virtual")
    dev = await env.device()
    await env.inject(dev, fail(Opcode.SAVE_VHCA_STATE, in_completion=True))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await dev.set_state(S.PRE_COPY_P2P)
    mark = dev.mark()
    with h.raises_errno(errno.ENODEV):
        await dev.set_state(S.STOP_COPY)
    assert [c.brief for c in dev.cmds(mark)] == [("SUSPEND", 1)]
    await assert_file_dead(f)


async def test_chunk_save_failure_latches_error(mlx5: h.Factory) -> None:
    """§5.6/§5.10: a continuation chunk SAVE (from the worker) that is refused
    marks the file ERROR: reads get ENODEV instead of waiting forever."""
    chunk = 16 * KiB
    env = await mlx5("virtual", max_chunk_size=chunk)
    dev = await env.device(h.vf_config(128 * KiB, chunks=True, chunk_size=chunk))
    await dev.set_state(S.STOP)
    f = await dev.set_state(S.STOP_COPY, drive=False)
    await env.inject(dev, fail(Opcode.SAVE_VHCA_STATE))  # the next one: chunk 2
    await env.wait_until(lambda: dev.saving_migf.state == MigfState.ERROR, "ERROR")
    await assert_file_dead(f)


async def test_refused_first_save_fails_the_arc_and_leaves_no_file(mlx5: h.Factory) -> None:
    """§5.7: RUNNING->PRE_COPY whose QUERY or SAVE fails returns the error, no
    fd (data_fd -1), the device stays RUNNING and can try again."""
    env = await mlx5()
    dev = await env.device()
    for opcode in (Opcode.QUERY_VHCA_MIGRATION_STATE, Opcode.SAVE_VHCA_STATE):
        await env.inject(dev, fail(opcode, CmdStatus.BAD_PARAM_ERR))
        data = bytearray(MIG_STATE.pack(S.PRE_COPY, 1234))
        with h.raises_errno(errno.EINVAL):
            await dev.set_state_raw(S.PRE_COPY, data)
        assert MIG_STATE.unpack(data) == (S.PRE_COPY, -1)
        assert dev.mvdev.saving_migf is None
        assert await dev.get_state() == S.RUNNING
    f = await dev.set_state(S.PRE_COPY)
    assert f is not None


# --------------------------------------------------------------------------------------
# reset and close
# --------------------------------------------------------------------------------------


async def test_reset_in_pre_copy_with_a_save_in_flight(mlx5: h.Factory) -> None:
    """§5.7 / README FLR: VFIO_DEVICE_RESET resets the function (its FLR
    completes the SAVE in flight with INT_ERR/ABORTED, so nothing waits), the
    FSM is RUNNING, the data file ended (reads ENODEV), the VF runs without
    tracking."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await dev.set_state(S.PRE_COPY, drive=False)
    assert (await dev.vf()).save_in_flight
    mark = dev.mark()
    await asyncio.wait_for(dev.core.reset(), 5)
    assert [c.brief for c in dev.cmds(mark)] == [("FLR",)]
    assert await dev.get_state() == S.RUNNING
    assert dev.mvdev.saving_migf is None
    await assert_file_dead(f)
    vf = await dev.vf()
    assert not vf.tracking and not vf.save_in_flight and await vf_runs(dev)
    # It migrates again.
    f2 = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    assert (await h.precopy_info(f2)).initial_bytes > 0


@pytest.mark.parametrize(
    "path",
    [
        (S.STOP,),
        (S.RUNNING_P2P,),
        (S.STOP, S.STOP_COPY),
        (S.PRE_COPY, S.PRE_COPY_P2P),
        (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY),
        (S.STOP, S.RESUMING),
    ],
    ids=lambda p: "->".join(s.name for s in p),
)
async def test_reset_returns_to_running_and_ends_the_files(
    mlx5: h.Factory, path: tuple[S, ...]
) -> None:
    """§1.1/§5.7: reset from any state: mig_state RUNNING, data files ended
    (saving: reads ENODEV; resuming: writes ENODEV), the firmware VF runs."""
    env = await mlx5()
    dev = await env.device()
    f = await dev.walk(*path)
    await env.settle(dev)
    if f is not None and dev.mvdev.saving_migf is f:
        await f.read(10)
    await dev.core.reset()
    assert await dev.get_state() == S.RUNNING
    assert dev.mvdev.saving_migf is None and dev.mvdev.resuming_migf is None
    if f is not None and path[-1] == S.RESUMING:
        with h.raises_errno(errno.ENODEV):
            await f.write(b"\0" * 16)
    elif f is not None:
        await assert_file_dead(f)
    assert await vf_runs(dev)
    assert not (await dev.vf()).tracking


async def test_close_ends_the_files_and_reopen_starts_at_running(mlx5: h.Factory) -> None:
    """§5.1: close_device disables the fds (and resets the function); the next
    open starts at RUNNING."""
    env = await mlx5()
    dev = await env.device()
    f = await dev.walk(S.PRE_COPY, S.PRE_COPY_P2P)
    await dev.core.close()
    await assert_file_dead(f)
    await dev.core.open()
    assert await dev.get_state() == S.RUNNING
    assert await vf_runs(dev)
    assert not (await dev.vf()).tracking


# --------------------------------------------------------------------------------------
# MIG_DATA_SIZE
# --------------------------------------------------------------------------------------


async def data_size_matches_firmware(env: h.Mlx5Env, dev: h.Dev, chunks: bool) -> int:
    mark = dev.mark()
    size = await dev.data_size()
    sent = dev.cmds(mark)
    assert [c.brief for c in sent] == [("QUERY", 0)]
    q = sent[0].result
    assert size == (q.remaining_total_size if chunks else q.required_umem_size)
    direct = await env.fw_query(dev, incremental=False, chunk=chunks)
    assert size == (direct.remaining_total_size if chunks else direct.required_umem_size)
    return size


@pytest.mark.parametrize("chunks", [False, True], ids=["whole", "chunks"])
async def test_mig_data_size_in_every_state(mlx5: h.Factory, chunks: bool) -> None:
    """§2 / §5.7: MIG_DATA_SIZE works in any state and is the firmware's full
    query: required_umem_size, or remaining_total_size in chunk mode; one
    QUERY(non-incremental), no SAVE."""
    chunk = 16 * KiB
    env = await mlx5("virtual", max_chunk_size=chunk)
    dev = await env.device(h.vf_config(96 * KiB, chunks=chunks, chunk_size=chunk))
    sizes = [await data_size_matches_firmware(env, dev, chunks)]
    for st in (S.RUNNING_P2P, S.STOP, S.RESUMING, S.STOP, S.RUNNING, S.PRE_COPY):
        await dev.set_state(st)
        await env.settle(dev)
        sizes.append(await data_size_matches_firmware(env, dev, chunks))
    await dev.set_state(S.PRE_COPY_P2P)
    sizes.append(await data_size_matches_firmware(env, dev, chunks))
    assert len(set(sizes)) == 1  # nothing changed the VF (no workload)
    assert sizes[0] > 96 * KiB
    await dev.set_state(S.STOP_COPY, drive=False)
    await data_size_matches_firmware(env, dev, chunks)
    f = dev.saving_migf
    await h.read_to_eof(env, f)
    await data_size_matches_firmware(env, dev, chunks)


async def test_mig_data_size_is_what_stop_copy_then_saves(mlx5: h.Factory) -> None:
    """§2: MIG_DATA_SIZE estimates the STOP_COPY bytes; with this firmware's
    exact sizes (README: QUERY says what SAVE writes) it is the total of the
    FW_DATA records of the next stop-copy stream, in chunk mode too."""
    chunk = 16 * KiB
    env = await mlx5("virtual", max_chunk_size=chunk)
    for chunks in (False, True):
        dev = await env.device(h.vf_config(128 * KiB, chunks=chunks, chunk_size=chunk))
        await dev.set_state(S.STOP)
        size = await dev.data_size()
        f = await dev.set_state(S.STOP_COPY)
        recs = h.parse_stream(await h.read_to_eof(env, f))
        assert sum(r.size for r in recs[1:]) == size


async def test_mig_data_size_after_an_abandoned_chunked_stop_copy(mlx5: h.Factory) -> None:
    """An orchestrator that aborts a stop-copy (STOP_COPY -> STOP) and starts it
    again gets a whole new stream; MIG_DATA_SIZE in between must describe
    that stream, as it does on a fresh device."""
    chunk = 16 * KiB
    env = await mlx5("virtual", max_chunk_size=chunk)
    cfg = h.vf_config(128 * KiB, chunks=True, chunk_size=chunk)
    dev, dst = await env.devices(2, cfg)
    await dev.set_state(S.STOP)
    fresh = await dev.data_size()
    f = await dev.set_state(S.STOP_COPY)
    await env.settle(dev)
    await f.read(24 + 16 + 100, nonblock=True)
    await dev.set_state(S.STOP)  # abandoned after the first piece
    size = await dev.data_size()
    f2 = await dev.set_state(S.STOP_COPY)
    stream = await h.read_to_eof(env, f2)
    total = sum(r.size for r in h.parse_stream(stream)[1:])
    # The new stream is whole and loads (the SAVE side is right) ...
    digest = await dev.digest()
    await dst.set_state(S.STOP)
    rf = await dst.set_state(S.RESUMING)
    await h.write_all(rf, stream)
    await dst.set_state(S.STOP)
    assert await dst.digest() == digest
    assert total == fresh
    # ... but the size reported before it was the abandoned image's leftover.
    assert size == total


async def test_mig_data_size_does_not_wait_for_a_save_in_flight(mlx5: h.Factory) -> None:
    """§5.7: the full query (flags 0) does not wait on the save semaphore."""
    env = await mlx5("virtual")
    dev = await env.device()
    await dev.set_state(S.PRE_COPY, drive=False)
    assert (await dev.vf()).save_in_flight
    size = await asyncio.wait_for(dev.data_size(), 2)
    assert size > 64 * KiB


async def test_mig_data_size_feature_arguments(mlx5: h.Factory) -> None:
    """§2: GET only; PROBE succeeds without data; a data part < 8 -> EINVAL;
    SET -> EINVAL.  No firmware command for any of them."""
    env = await mlx5()
    dev = await env.device()
    mark = dev.mark()
    assert await dev.feature(h.PROBE | h.GET | Feature.MIG_DATA_SIZE) == b""
    with h.raises_errno(errno.EINVAL):
        await dev.feature(h.GET | Feature.MIG_DATA_SIZE, bytes(7))
    with h.raises_errno(errno.EINVAL):
        await dev.feature(h.SET | Feature.MIG_DATA_SIZE, bytes(MIG_DATA_SIZE.size))
    assert dev.cmds(mark) == []


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0, 8, 9, 0xFFFFFFFF])
async def test_invalid_target_state_is_einval_and_sends_nothing(
    mlx5: h.Factory, target: int
) -> None:
    """§1.3: ERROR or an out-of-range state as target -> EINVAL, the device
    does not move and no firmware command is sent."""
    env = await mlx5()
    dev = await env.device()
    mark = dev.mark()
    with h.raises_errno(errno.EINVAL):
        await dev.set_state_raw(target)
    assert dev.cmds(mark) == []
    assert await dev.get_state() == S.RUNNING


async def test_stop_copy_to_pre_copy_is_einval(mlx5: h.Factory) -> None:
    """§1.3: STOP_COPY -> PRE_COPY(_P2P) has no path: EINVAL, still STOP_COPY,
    the stream still readable."""
    env = await mlx5()
    dev = await env.device()
    f = await dev.walk(S.STOP, S.STOP_COPY)
    for target in (S.PRE_COPY, S.PRE_COPY_P2P):
        with h.raises_errno(errno.EINVAL):
            await dev.set_state(target)
    assert await dev.get_state() == S.STOP_COPY
    assert len(await h.read_to_eof(env, f)) > 64 * KiB


@pytest.mark.parametrize("seed", range(6))
async def test_garbage_stream_fails_cleanly(mlx5: h.Factory, seed: int) -> None:
    """§5.9: random bytes behind a plausible small FW_DATA header are refused
    (EINVAL: the firmware rejects the image) or an unknown mandatory tag
    (EOPNOTSUPP); the file latches, nothing hangs, the target is unchanged."""
    import random

    rng = random.Random(seed)
    env = await mlx5()
    dst = await env.device()
    await dst.set_state(S.STOP)
    before = await dst.digest()
    f = await dst.set_state(S.RESUMING)
    body = rng.randbytes(rng.randrange(1, 9000))
    if seed % 2:
        body = b"VHCA" + body  # right magic, wrong everything else
    tag = 0 if seed < 4 else rng.randrange(2, 1 << 32)
    stream = (len(body)).to_bytes(8, "little") + bytes(4) + tag.to_bytes(4, "little") + body
    with pytest.raises(Exception) as info:
        await asyncio.wait_for(h.write_all(f, stream, [5, 100, 3000]), 5)
    assert getattr(info.value, "errno", None) in (errno.EINVAL, errno.EOPNOTSUPP)
    with h.raises_errno(errno.ENODEV):
        await f.write(b"\0" * 16)
    await dst.set_state(S.STOP)
    assert await dst.digest() == before


# --------------------------------------------------------------------------------------
# nothing waits forever
# --------------------------------------------------------------------------------------


async def test_dropped_save_completion_times_out_into_error(mlx5: h.Factory) -> None:
    """A SAVE whose completion never comes (DROP_COMPLETION) is completed by the
    command timeout with -ETIMEDOUT (mlx5_cmd_exec_cb), which is not
    BAD_RES_STATE: the file goes to ERROR and the blocked reader gets ENODEV
    instead of waiting forever."""
    env = await mlx5(cmd_timeout=0.5)
    dev = await env.device(h.vf_config(dirty=4 << 20))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await h.read_available(f)
    await asyncio.sleep(0.02)
    await env.inject(dev, Fault(FaultKind.DROP_COMPLETION))
    await h.precopy_info(f)  # issues the SAVE whose completion is dropped
    reader = asyncio.ensure_future(f.read(1 << 20))
    await asyncio.sleep(0.05)
    assert not reader.done()
    with h.raises_errno(errno.ENODEV):
        await asyncio.wait_for(reader, 5)
    assert dev.saving_migf.state == MigfState.ERROR
    assert not dev.saving_migf.save_comp.locked()
    # Leaving PRE_COPY now fails (the cleanup query is blocked); a reset recovers.
    with h.raises_errno(errno.ENODEV):
        await dev.set_state(S.RUNNING)
    await dev.core.reset()
    assert await dev.get_state() == S.RUNNING


async def test_reset_wakes_a_reader_blocked_on_a_save_in_flight(mlx5: h.Factory) -> None:
    """A blocking read waiting for a SAVE held in flight is woken by
    VFIO_DEVICE_RESET (the FLR aborts the SAVE, the file ends): ENODEV."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await h.precopy_with_dirt(env, dev)
    await h.precopy_info(f)  # the SAVE stays in flight (the clock is held)
    reader = asyncio.ensure_future(f.read(1 << 20))
    await asyncio.sleep(0.05)
    assert not reader.done()
    await asyncio.wait_for(dev.core.reset(), 5)
    with h.raises_errno(errno.ENODEV):
        await asyncio.wait_for(reader, 5)


async def test_stop_copy_save_failing_with_bad_res_state_is_error_not_pre_copy_error(
    mlx5: h.Factory,
) -> None:
    """§5.5: PRE_COPY_ERROR is only for non-stop-copy SAVEs; the final SAVE
    completing with BAD_RES_STATE puts the file in ERROR (reads ENODEV)."""
    env = await mlx5()
    dev = await env.device()
    f = await dev.walk(S.PRE_COPY, S.PRE_COPY_P2P)
    await h.read_available(f)
    await env.inject(
        dev, fail(Opcode.SAVE_VHCA_STATE, CmdStatus.BAD_RES_STATE_ERR, in_completion=True)
    )
    await dev.set_state(S.STOP_COPY)
    await env.settle(dev)
    assert dev.saving_migf.state == MigfState.ERROR
    await assert_file_dead(f)


async def test_the_file_of_an_earlier_session_is_dead(mlx5: h.Factory) -> None:
    """A saving file whose session ended stays ERROR when a new session starts:
    reads and GET_PRECOPY_INFO on it get ENODEV (the device is in PRE_COPY
    again, so the state check passes and the file's own check answers)."""
    env = await mlx5()
    dev = await env.device()
    old = await dev.set_state(S.PRE_COPY)
    await dev.set_state(S.RUNNING)
    new = await dev.set_state(S.PRE_COPY)
    assert new is not old
    await assert_file_dead(old)
    with h.raises_errno(errno.ENODEV):
        await h.precopy_info(old)
    assert (await h.precopy_info(new)).initial_bytes > 0
