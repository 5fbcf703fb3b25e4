"""PRE_COPY_ERROR (reference §5.5 step 7, §5.4, §5.10): the firmware lost
tracking, the next incremental SAVE completes with BAD_RES_STATE, and mlx5vf
carries on with a full final image instead of failing the migration."""

from __future__ import annotations

import asyncio
import errno
import struct
from typing import Any

import pytest

from driver.mlx5.cmd import MigfState
from driver.vfio.uapi import VFIO_PRECOPY_INFO_REINIT, MigState
from fwemu.link.ifc import CmdStatus, Fault, FaultKind, Syndrome
from tests.support import mlx5 as h

S = MigState

pytestmark = pytest.mark.timeout(60)

# The emulated firmware's image header: magic, version, kind, flags, profile,
# chain id, seq, piece (fwemu/model/image.py)
IMAGE = struct.Struct("<4sHBBIQII")
FULL = 0


async def lose_tracking(env: h.Mlx5Env, dev: h.Dev, f: Any) -> bytes:
    """PRE_COPY with the first image read; tracking lost; the next incremental
    SAVE (issued by GET_PRECOPY_INFO) fails.  Returns the stream read so far."""
    stream = await h.read_available(f)
    await env.inject(dev, Fault(FaultKind.TRACKING_LOST))
    await env.advance(0.02)
    mark = dev.mark()
    info = await h.precopy_info(f)
    assert info.dirty_bytes > 16  # announced before the SAVE failed
    await env.settle(dev)
    [save] = [c for c in dev.cmds(mark) if c.name == "SAVE"]
    assert save.brief == ("SAVE", 1, 1)
    assert save.completion is not None
    assert save.completion.status == CmdStatus.BAD_RES_STATE_ERR
    assert save.completion.syndrome == Syndrome.TRACKING_LOST
    return stream


async def test_tracking_loss_puts_the_file_in_pre_copy_error(mlx5: h.Factory) -> None:
    """§5.5: BAD_RES_STATE on a non-stop-copy SAVE -> PRE_COPY_ERROR (not
    ERROR); §5.10: reads at the end give ENOMSG without waiting (blocking
    too); incremental queries report 0 without a firmware command, so
    GET_PRECOPY_INFO reports only queued bytes, issues no SAVE and (v2 opted in)
    never REINIT."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    await dev.opt_in_v2()
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await lose_tracking(env, dev, f)
    assert dev.saving_migf.state == MigfState.PRE_COPY_ERROR
    assert not (await dev.vf()).tracking
    for nonblock in (False, True):
        with h.raises_errno(errno.ENOMSG):
            await asyncio.wait_for(f.read(4096, nonblock=nonblock), 1)

    await env.advance(0.05)
    await env.reconfigure(dev)
    mark = dev.mark()
    info = await h.precopy_info(f, flags=0xFF)
    assert dev.cmds(mark) == []
    assert (info.flags, info.initial_bytes, info.dirty_bytes) == (0, 0, 0)
    assert not info.flags & VFIO_PRECOPY_INFO_REINIT
    with h.raises_errno(errno.ENOMSG):
        await asyncio.wait_for(f.read(4096), 1)


async def test_migration_completes_after_tracking_loss_with_a_full_final_image(
    mlx5_wide: h.Factory,
) -> None:
    """§5.4/§5.5: in PRE_COPY_ERROR the final QUERY(INC|FINAL) is sent as a full
    (non-incremental) query and the final SAVE as SAVE(inc 0, track 0): the
    stop-copy image is a FULL one, which replaces what the target loaded
    before; the target ends with the source's digest."""
    env = await mlx5_wide("virtual")
    src, dst = await env.devices(2, h.vf_config(96 * 1024, dirty=1 << 20))
    f = await src.set_state(S.PRE_COPY)
    await env.settle(src)
    stream = await lose_tracking(env, src, f)
    await src.set_state(S.PRE_COPY_P2P)
    mark = src.mark()
    await src.set_state(S.STOP_COPY)
    sent = src.cmds(mark)
    assert [c.brief for c in sent] == [("SUSPEND", 1), ("QUERY", 0), ("SAVE", 0, 0)]
    stream += await h.read_to_eof(env, f)
    await src.set_state(S.STOP)
    src_digest = await src.digest()

    recs = h.parse_stream(stream)
    kinds = [IMAGE.unpack_from(r.payload)[2] for r in recs[1:]]
    assert kinds == [FULL, FULL]  # the initial image, then the full final one
    chains = [IMAGE.unpack_from(r.payload)[5] for r in recs[1:]]
    assert chains[0] != chains[1]  # a new chain

    await dst.set_state(S.STOP)
    rf = await dst.set_state(S.RESUMING)
    await h.write_all(rf, stream)
    await dst.set_state(S.STOP)
    assert await dst.digest() == src_digest


async def test_leaving_pre_copy_after_tracking_loss_still_cleans_up(mlx5: h.Factory) -> None:
    """§5.4: the cleanup query ignores PRE_COPY_ERROR (QUERY(INC|CLEANUP) is
    sent); §5.7: the cleanup SAVE follows and the arc succeeds."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await lose_tracking(env, dev, f)
    mark = dev.mark()
    assert await dev.set_state(S.RUNNING) is None
    assert [c.brief for c in dev.cmds(mark)] == [("QUERY", 1), ("SAVE", 0, 0)]
    assert await dev.get_state() == S.RUNNING


async def test_reader_waiting_on_the_failing_save_gets_enomsg(mlx5: h.Factory) -> None:
    """Patch 5/6 + §5.10: a blocking read waits while the incremental SAVE is
    in flight; when it completes with BAD_RES_STATE (tracking lost) the file
    is PRE_COPY_ERROR and the reader wakes with ENOMSG (not ENODEV)."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await h.read_available(f)
    await env.inject(dev, Fault(FaultKind.TRACKING_LOST))
    await env.advance(0.02)
    await h.precopy_info(f)  # the SAVE stays in flight (the clock is held)
    reader = asyncio.ensure_future(f.read(1 << 20))
    await asyncio.sleep(0.05)
    assert not reader.done()
    await env.advance(0)
    with h.raises_errno(errno.ENOMSG):
        await asyncio.wait_for(reader, 5)
    assert dev.saving_migf.state == MigfState.PRE_COPY_ERROR
