"""VFIO_MIG_GET_PRECOPY_INFO on an mlx5 saving file (reference §3, §5.8, the
seed thread's patches 5/6 and 6/6): initial/dirty byte accounting, the v1 flag
echo, the v2 opt-in and VFIO_PRECOPY_INFO_REINIT.

Most tests run on a virtual clock so that the firmware's answers (and so the
byte counts) are exact: the workload dirties pages only when the test moves
the clock, and a SAVE completes only then."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from driver.vfio.uapi import (
    PRECOPY_INFO,
    VFIO_MIG_GET_PRECOPY_INFO,
    VFIO_PRECOPY_INFO_REINIT,
    Feature,
    MigState,
)
from fwemu.link.ifc import CmdStatus, Fault, FaultKind, KiB, Opcode, QueryVhcaMigState
from tests.support import mlx5 as h

S = MigState

pytestmark = pytest.mark.timeout(60)

REINIT = VFIO_PRECOPY_INFO_REINIT
ECHO = 0xDEADBEEF


async def pre_copy(env: h.Mlx5Env, dev: h.Dev) -> tuple[Any, int]:
    """RUNNING -> PRE_COPY with the first SAVE completed; (file, full image size)."""
    mark = dev.mark()
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    save = next(c for c in dev.cmds(mark) if c.name == "SAVE")
    assert save.completion is not None and save.completion.status == 0
    return f, save.completion.actual_image_size


def last_inc_query(dev: h.Dev, mark: int) -> int:
    """The inc_length the driver got from its QUERY(INC) since `mark`."""
    [q] = [c for c in dev.cmds(mark) if c.name == "QUERY"]
    assert q.args["incremental"] is True
    return int(q.result.required_umem_size)


def saves_since(dev: h.Dev, mark: int) -> list[tuple[Any, ...]]:
    return [c.brief for c in dev.cmds(mark) if c.name == "SAVE"]


# --------------------------------------------------------------------------------------
# initial_bytes / dirty_bytes
# --------------------------------------------------------------------------------------


async def test_initial_bytes_waits_for_the_first_save_then_counts_it(mlx5: h.Factory) -> None:
    """§5.8: the PRE_COPY query waits until no SAVE is in flight; §5.6/§5.5:
    initial_bytes is then 24 (STOP_COPY_SIZE) + 16 + the full tracked image,
    which is the firmware's full-query size; dirty_bytes 0."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(96 * KiB))
    mark = dev.mark()
    f = await dev.set_state(S.PRE_COPY, drive=False)
    full = dev.cmds(mark)[0].result.required_umem_size
    assert (await dev.vf()).save_in_flight
    task = asyncio.ensure_future(h.precopy_info(f))
    await asyncio.sleep(0.05)
    assert not task.done()  # held: the SAVE is still in flight
    await env.advance(0)
    info = await asyncio.wait_for(task, 5)
    assert info.initial_bytes == h.STOP_COPY_SIZE_RECORD + 16 + full
    assert info.dirty_bytes == 0
    assert info.argsz == PRECOPY_INFO.size


async def test_initial_bytes_count_down_as_the_stream_is_read(mlx5: h.Factory) -> None:
    """§3.1: initial_bytes falls by exactly what was read; at 0 with nothing
    dirty both counters are 0 and read() hits the temporary end (ENOMSG)."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(64 * KiB))
    f, image = await pre_copy(env, dev)
    left = h.STOP_COPY_SIZE_RECORD + 16 + image
    for n in (1, 23, 16, 4095, 10_000, 1 << 20):
        got = await f.read(n)
        assert len(got) == min(n, left)
        left -= len(got)
        info = await h.precopy_info(f)
        assert (info.initial_bytes, info.dirty_bytes) == (left, 0)
    assert left == 0
    with h.raises_errno(errno.ENOMSG):
        await f.read(1)


async def test_dirty_bytes_are_queued_plus_inc_length_plus_header_of_the_new_save(
    mlx5: h.Factory,
) -> None:
    """§5.8 (after the series): past the initial bytes, dirty_bytes = (max_pos -
    f_pos) + inc_length; at the end of the queued data with inc_length > 0 a
    SAVE(inc 1, track 1) is issued and its 16-byte header is counted too.  With
    data still queued no SAVE is issued and nothing is added."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(128 * KiB, dirty=1 << 20))
    f, _ = await pre_copy(env, dev)
    await h.read_available(f)

    await env.advance(0.02)  # the workload dirties a few pages
    expect = (await env.fw_query(dev, incremental=True, chunk=False)).required_umem_size
    assert expect > 0
    mark = dev.mark()
    info = await h.precopy_info(f)
    inc = last_inc_query(dev, mark)
    assert inc == expect
    assert (info.initial_bytes, info.dirty_bytes) == (0, inc + 16)
    assert saves_since(dev, mark) == [("SAVE", 1, 1)]

    await env.settle(dev)  # the SAVE wrote exactly inc bytes; nothing changed since
    mark = dev.mark()
    info = await h.precopy_info(f)
    assert last_inc_query(dev, mark) == 0
    assert (info.initial_bytes, info.dirty_bytes) == (0, 16 + inc)
    assert saves_since(dev, mark) == []

    await f.read(100)
    await env.advance(0.02)  # more dirt while data is queued
    mark = dev.mark()
    info = await h.precopy_info(f)
    inc2 = last_inc_query(dev, mark)
    assert inc2 > 0
    assert info.dirty_bytes == (16 + inc - 100) + inc2  # no SAVE, no +16
    assert saves_since(dev, mark) == []

    got = await h.read_available(f)
    assert len(got) == 16 + inc - 100
    mark = dev.mark()
    info = await h.precopy_info(f)
    assert info.dirty_bytes == inc2 + 16
    assert saves_since(dev, mark) == [("SAVE", 1, 1)]


async def test_temporary_end_when_nothing_changed(mlx5: h.Factory) -> None:
    """The firmware reports inc_length 0 when nothing changed (README), so with
    everything read both counters are 0, no SAVE is issued and read() gives
    ENOMSG (§4: temporary end of stream in PRE_COPY)."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=0))
    f, _ = await pre_copy(env, dev)
    await h.read_available(f)
    await env.advance(1.0)
    mark = dev.mark()
    info = await h.precopy_info(f)
    assert (info.initial_bytes, info.dirty_bytes) == (0, 0)
    assert saves_since(dev, mark) == []
    with h.raises_errno(errno.ENOMSG):
        await f.read(4096)


# --------------------------------------------------------------------------------------
# v1 echo, v2 opt-in, REINIT
# --------------------------------------------------------------------------------------


async def test_v1_echoes_flags_and_never_reports_reinit(mlx5: h.Factory) -> None:
    """§3.2: without the MIG_PRECOPY_INFOv2 opt-in the flags the caller passed
    come back unchanged, even when the firmware reports OPER_MIGRATION_INIT;
    the new initial data is then just dirty data (§5.8 not-reinit branch)."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=0))
    f, image = await pre_copy(env, dev)
    info = await h.precopy_info(f, flags=ECHO)
    assert info.flags == ECHO
    assert info.initial_bytes == h.STOP_COPY_SIZE_RECORD + 16 + image
    await h.read_available(f)

    await env.reconfigure(dev)
    assert (await dev.vf()).migration_state == QueryVhcaMigState.OPER_MIGRATION_INIT
    mark = dev.mark()
    info = await h.precopy_info(f, flags=ECHO)
    inc = last_inc_query(dev, mark)
    assert dev.cmds(mark)[0].result.migration_state == QueryVhcaMigState.OPER_MIGRATION_INIT
    assert info.flags == ECHO
    assert (info.initial_bytes, info.dirty_bytes) == (0, inc + 16)
    await env.settle(dev)
    for flags in (0, REINIT, 0xFFFFFFFF):
        assert (await h.precopy_info(f, flags=flags)).flags == flags
    assert dev.mvdev.stats.reinits == 0


async def test_v2_zeroes_flags(mlx5: h.Factory) -> None:
    """§3.3: after SET MIG_PRECOPY_INFOv2 the helper zeroes flags, whatever the
    caller passed, when there is no REINIT."""
    env = await mlx5("virtual")
    dev = await env.device()
    await dev.opt_in_v2()
    f, _ = await pre_copy(env, dev)
    assert (await h.precopy_info(f, flags=ECHO)).flags == 0
    assert (await h.precopy_info(f, flags=REINIT)).flags == 0


async def test_v2_reinit_with_unread_bytes_queued(mlx5: h.Factory) -> None:
    """Patch 6/6 / §5.8: opted in and the firmware reporting INIT: flags =
    REINIT, dirty_bytes 0, the queued unread bytes become initial, and a SAVE
    is issued even though data is queued: initial_bytes = queued + inc_length +
    16.  After it completed, initial_bytes is the same (no REINIT any more) and
    counts down to 0 as the stream is read."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=0))
    await dev.opt_in_v2()
    f, image = await pre_copy(env, dev)
    first = h.STOP_COPY_SIZE_RECORD + 16 + image
    await f.read(100)

    await env.reconfigure(dev, [("QP", 20 * KiB)])
    mark = dev.mark()
    info = await h.precopy_info(f, flags=ECHO)
    inc = last_inc_query(dev, mark)
    assert inc > 20 * KiB
    assert info.flags == REINIT
    assert info.dirty_bytes == 0
    assert info.initial_bytes == (first - 100) + inc + 16
    assert saves_since(dev, mark) == [("SAVE", 1, 1)]
    assert dev.mvdev.stats.reinits == 1

    await env.settle(dev)
    assert (await dev.vf()).migration_state != QueryVhcaMigState.OPER_MIGRATION_INIT
    again = await h.precopy_info(f, flags=ECHO)
    assert again.flags == 0
    assert (again.initial_bytes, again.dirty_bytes) == (info.initial_bytes, 0)

    left = again.initial_bytes
    while left:
        got = await f.read(7000)
        left -= len(got)
        now = await h.precopy_info(f)
        assert (now.flags, now.initial_bytes, now.dirty_bytes) == (0, left, 0)
    with h.raises_errno(errno.ENOMSG):
        await f.read(1)


async def test_v2_reinit_with_nothing_queued(mlx5: h.Factory) -> None:
    """§5.8: REINIT at the end of the queued data: initial_bytes = inc_length +
    16 (the new SAVE's record), dirty_bytes 0; it counts down to 0 again."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=0))
    await dev.opt_in_v2()
    f, _ = await pre_copy(env, dev)
    await h.read_available(f)
    assert (await h.precopy_info(f)).initial_bytes == 0

    await env.reconfigure(dev)
    mark = dev.mark()
    info = await h.precopy_info(f)
    inc = last_inc_query(dev, mark)
    assert (info.flags, info.initial_bytes, info.dirty_bytes) == (REINIT, inc + 16, 0)
    await env.settle(dev)
    got = await h.read_available(f)
    assert len(got) == inc + 16
    info = await h.precopy_info(f)
    assert (info.flags, info.initial_bytes, info.dirty_bytes) == (0, 0, 0)


async def test_v2_reinit_resets_dirty_bytes(mlx5: h.Factory) -> None:
    """§3.3 (uAPI): on REINIT dirty_bytes is reset to 0 and relative to the new
    initial data: dirty data queued before becomes initial."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    await dev.opt_in_v2()
    f, _ = await pre_copy(env, dev)
    await h.read_available(f)
    await env.advance(0.02)
    dirty = await h.precopy_info(f)  # issues an incremental SAVE
    await env.settle(dev)
    assert dirty.dirty_bytes > 0 and dirty.initial_bytes == 0
    queued = dirty.dirty_bytes

    await env.reconfigure(dev)
    mark = dev.mark()
    info = await h.precopy_info(f)
    inc = last_inc_query(dev, mark)
    assert (info.flags, info.dirty_bytes) == (REINIT, 0)
    assert info.initial_bytes == queued + inc + 16


async def test_no_reinit_in_pre_copy_p2p_where_the_firmware_is_not_queried(
    mlx5: h.Factory,
) -> None:
    """§5.8: in PRE_COPY_P2P there is no QUERY (inc_length 0, never REINIT):
    only queued bytes are reported.  Back in PRE_COPY the pending INIT is
    reported as REINIT."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=0))
    await dev.opt_in_v2()
    f, image = await pre_copy(env, dev)
    await f.read(10)
    await env.reconfigure(dev)
    await dev.set_state(S.PRE_COPY_P2P)
    assert (await dev.vf()).migration_state == QueryVhcaMigState.OPER_MIGRATION_INIT

    mark = dev.mark()
    info = await h.precopy_info(f, flags=ECHO)
    assert dev.cmds(mark) == []  # no firmware query at all
    assert (info.flags, info.initial_bytes, info.dirty_bytes) == (
        0,
        h.STOP_COPY_SIZE_RECORD + 16 + image - 10,
        0,
    )
    await h.read_available(f)
    info = await h.precopy_info(f)
    assert (info.flags, info.initial_bytes, info.dirty_bytes) == (0, 0, 0)
    assert dev.cmds(mark) == []

    await dev.set_state(S.PRE_COPY)
    mark = dev.mark()
    info = await h.precopy_info(f)
    inc = last_inc_query(dev, mark)
    assert (info.flags, info.initial_bytes, info.dirty_bytes) == (REINIT, inc + 16, 0)


async def test_pre_copy_p2p_reports_queued_dirty_bytes_only(mlx5: h.Factory) -> None:
    """§5.8: in PRE_COPY_P2P, dirty_bytes is max_pos - f_pos, nothing more (the
    device is suspended: no query, no SAVE)."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f, _ = await pre_copy(env, dev)
    await h.read_available(f)
    await env.advance(0.02)
    info = await h.precopy_info(f)
    await env.settle(dev)
    await dev.set_state(S.PRE_COPY_P2P)
    mark = dev.mark()
    assert (await h.precopy_info(f)).dirty_bytes == info.dirty_bytes
    await f.read(5)
    assert (await h.precopy_info(f)).dirty_bytes == info.dirty_bytes - 5
    assert dev.cmds(mark) == []


# --------------------------------------------------------------------------------------
# errors and the opt-in's lifetime
# --------------------------------------------------------------------------------------


async def test_einval_outside_pre_copy_states(mlx5: h.Factory) -> None:
    """§5.8: the state must be PRE_COPY or PRE_COPY_P2P: in STOP_COPY (same
    saving file) and after leaving PRE_COPY the ioctl fails with EINVAL (the
    state check comes before the file's ERROR check); a STOP->STOP_COPY file
    gets EINVAL too."""
    env = await mlx5()
    dev = await env.device()
    f = await dev.walk(S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY)
    with h.raises_errno(errno.EINVAL):
        await h.precopy_info(f)
    await h.read_to_eof(env, f)
    with h.raises_errno(errno.EINVAL):
        await h.precopy_info(f)
    await dev.set_state(S.STOP)
    with h.raises_errno(errno.EINVAL):
        await h.precopy_info(f)
    f2 = await dev.set_state(S.STOP_COPY)
    with h.raises_errno(errno.EINVAL):
        await h.precopy_info(f2)
    await dev.walk(S.STOP, S.RUNNING)
    f3 = await dev.set_state(S.PRE_COPY)
    await dev.set_state(S.RUNNING)
    with h.raises_errno(errno.EINVAL):
        await h.precopy_info(f3)


async def test_enodev_on_a_file_in_error(mlx5: h.Factory) -> None:
    """§5.10: a saving file in ERROR answers the precopy ioctl with ENODEV, in
    PRE_COPY (the incremental query is blocked) and in PRE_COPY_P2P (the
    driver's own check)."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f, _ = await pre_copy(env, dev)
    await h.read_available(f)
    await env.advance(0.02)
    await env.inject(
        dev,
        Fault(FaultKind.FAIL, Opcode.SAVE_VHCA_STATE, CmdStatus.INT_ERR, in_completion=True),
    )
    await h.precopy_info(f)  # issues the SAVE that fails
    await env.settle(dev)
    assert dev.saving_migf.state.name == "ERROR"
    mark = dev.mark()
    with h.raises_errno(errno.ENODEV):
        await h.precopy_info(f)
    assert dev.cmds(mark) == []  # blocked before the firmware
    await dev.set_state(S.PRE_COPY_P2P)
    with h.raises_errno(errno.ENODEV):
        await h.precopy_info(f)


async def test_v2_opt_in_is_sticky_across_opens_and_cleared_at_last_close(mlx5: h.Factory) -> None:
    """§3.3: precopy_info_v2 is per device, survives while any user has it open,
    and vfio_df_device_last_close() clears it."""
    env = await mlx5("virtual")
    dev = await env.device()
    await dev.core.open()  # a second user
    await dev.opt_in_v2()
    await dev.core.close()  # not the last close
    f, _ = await pre_copy(env, dev)
    assert (await h.precopy_info(f, flags=ECHO)).flags == 0
    await dev.set_state(S.RUNNING)

    await dev.core.close()  # the last close
    assert not dev.core.precopy_info_v2
    await dev.core.open()
    f, _ = await pre_copy(env, dev)
    assert (await h.precopy_info(f, flags=ECHO)).flags == ECHO


async def test_v2_probe_and_get(mlx5: h.Factory) -> None:
    """§2 (feature 12): PROBE succeeds and opts nothing in; GET is EINVAL; SET
    ignores supplied data."""
    env = await mlx5("virtual")
    dev = await env.device()
    assert await dev.feature(h.PROBE | h.SET | Feature.MIG_PRECOPY_INFOv2) == b""
    assert await dev.feature(h.PROBE | Feature.MIG_PRECOPY_INFOv2) == b""
    with h.raises_errno(errno.EINVAL):
        await dev.feature(h.GET | Feature.MIG_PRECOPY_INFOv2)
    f, _ = await pre_copy(env, dev)
    assert (await h.precopy_info(f, flags=ECHO)).flags == ECHO
    assert await dev.feature(h.SET | Feature.MIG_PRECOPY_INFOv2, b"junkdata") == b"junkdata"
    assert (await h.precopy_info(f, flags=ECHO)).flags == 0  # takes effect at once


async def test_bad_precopy_ioctl_arguments(mlx5: h.Factory) -> None:
    """§3.1: argsz < 24 -> EINVAL; fewer than 24 bytes at the pointer -> EFAULT;
    another ioctl number -> ENOTTY; a larger argsz is accepted (and echoed).
    None of them disturbs the stream."""
    env = await mlx5("virtual")
    dev = await env.device()
    f, image = await pre_copy(env, dev)
    for argsz in (0, 8, 23):
        with h.raises_errno(errno.EINVAL):
            await f.ioctl(VFIO_MIG_GET_PRECOPY_INFO, PRECOPY_INFO.pack(argsz, 0, 0, 0))
    for short in (b"", PRECOPY_INFO.pack(24, 0, 0, 0)[:23]):
        with h.raises_errno(errno.EFAULT):
            await f.ioctl(VFIO_MIG_GET_PRECOPY_INFO, short)
    for cmd in (0x3B75, VFIO_MIG_GET_PRECOPY_INFO + 1, 0):
        with h.raises_errno(errno.ENOTTY):
            await f.ioctl(cmd, PRECOPY_INFO.pack(24, 0, 0, 0))
    info = await h.precopy_info(f, argsz=64)
    assert info.argsz == 64
    assert info.initial_bytes == h.STOP_COPY_SIZE_RECORD + 16 + image


async def test_output_fields_the_driver_does_not_set_echo_the_caller(mlx5: h.Factory) -> None:
    """§3.2/patch 3/6: vfio_check_precopy_ioctl copies all 24 bytes in and the
    driver copies 24 bytes back, setting only initial_bytes (initial branch) or
    only dirty_bytes (dirty branch): the other field echoes what the caller
    passed, as in the kernel (userspace passes zeros)."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=0))
    f, image = await pre_copy(env, dev)
    out = await f.ioctl(VFIO_MIG_GET_PRECOPY_INFO, PRECOPY_INFO.pack(24, 0, 111, 222))
    assert PRECOPY_INFO.unpack(out) == (24, 0, h.STOP_COPY_SIZE_RECORD + 16 + image, 222)
    await h.read_available(f)
    out = await f.ioctl(VFIO_MIG_GET_PRECOPY_INFO, PRECOPY_INFO.pack(24, 0, 111, 222))
    assert PRECOPY_INFO.unpack(out) == (24, 0, 111, 0)


async def test_v2_opt_in_is_per_device(mlx5: h.Factory) -> None:
    """§3.3: precopy_info_v2 lives in struct vfio_device: opting one device in
    leaves another (on the same firmware) at v1."""
    env = await mlx5("virtual")
    a, b = await env.devices(2)
    await a.opt_in_v2()
    fa, _ = await pre_copy(env, a)
    fb, _ = await pre_copy(env, b)
    assert (await h.precopy_info(fa, flags=ECHO)).flags == 0
    assert (await h.precopy_info(fb, flags=ECHO)).flags == ECHO


async def test_pre_copy_p2p_info_does_not_wait_for_the_save_in_flight(mlx5: h.Factory) -> None:
    """§5.8: only PRE_COPY queries the firmware (and so waits for a SAVE in
    flight).  RUNNING_P2P -> PRE_COPY_P2P starts the file with its first SAVE
    held in flight: GET_PRECOPY_INFO answers at once with what is queued (the
    24-byte size record); once the SAVE completed, the image is counted."""
    env = await mlx5("virtual")
    dev = await env.device()
    await dev.set_state(S.RUNNING_P2P)
    mark = dev.mark()
    f = await dev.set_state(S.PRE_COPY_P2P, drive=False)
    assert (await dev.vf()).save_in_flight
    info = await asyncio.wait_for(h.precopy_info(f), 2)
    assert (info.initial_bytes, info.dirty_bytes) == (h.STOP_COPY_SIZE_RECORD, 0)
    await env.settle(dev)
    [save] = [c for c in dev.cmds(mark) if c.name == "SAVE"]
    assert save.brief == ("SAVE", 0, 1) and save.completion is not None
    info = await h.precopy_info(f)
    assert info.initial_bytes == h.STOP_COPY_SIZE_RECORD + 16 + save.completion.actual_image_size


async def test_blocking_read_after_reinit_waits_for_the_new_initial_chunk(
    mlx5: h.Factory,
) -> None:
    """Patch 5/6's reason: after a REINIT with nothing queued, the new initial
    chunk comes from the SAVE the ioctl issued; a blocking read waits for it
    (no ENOMSG while initial_bytes > 0) and gets exactly initial_bytes."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=0))
    await dev.opt_in_v2()
    f, _ = await pre_copy(env, dev)
    await h.read_available(f)
    await env.reconfigure(dev)
    info = await h.precopy_info(f)
    assert info.flags == REINIT and info.initial_bytes > 16
    reader = asyncio.ensure_future(f.read(1 << 20))
    await asyncio.sleep(0.05)
    assert not reader.done()
    await env.advance(0)
    got = await asyncio.wait_for(reader, 5)
    assert len(got) == info.initial_bytes
