"""Function level reset (what VFIO_DEVICE_RESET does to the VF)."""

from __future__ import annotations

from fwemu.link.ifc import CmdStatus, KiB, QueryVhcaMigState, Syndrome


async def test_flr_resumes_a_suspended_vf(h):
    """FLR resumes the VF (initiator and responder)."""
    vhca = await h.vf(size=64 * KiB)
    await h.suspend_fully(vhca)
    res = await h.link.function_level_reset(vhca)
    assert res.ok, res
    info = await h.info(vhca)
    assert (info.initiator_suspended, info.responder_suspended) == (False, False)
    assert (await h.suspend(vhca, 0)).ok  # RUNNING again


async def test_flr_ends_tracking(h):
    """FLR ends tracking: migration_state UNINITIALIZED, incremental SAVEs NO_TRACKING."""
    vhca = await h.vf(size=64 * KiB, dirty_bytes_per_s=64 * KiB)
    await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    await h.advance(0.5)
    assert await h.mig_state(vhca) == QueryVhcaMigState.OPER_MIGRATION_DIRTY
    assert (await h.link.function_level_reset(vhca)).ok
    assert (await h.info(vhca)).tracking is False
    assert await h.mig_state(vhca) == QueryVhcaMigState.UNINITIALIZED
    pending = await h.save(vhca, 64 * KiB, incremental=True, set_track=True)
    assert pending.accepted.syndrome == Syndrome.NO_TRACKING


async def test_flr_aborts_an_in_flight_save_with_int_err_aborted(h):
    """The in-flight SAVE completes at once with INT_ERR / ABORTED, exactly once
    (its own timer later does not complete it again), and the VF takes a new
    SAVE right away."""
    vhca = await h.vf(size=64 * KiB, save_latency_s=1.0)
    size = (await h.query(vhca)).required_umem_size
    pending = await h.save(vhca, size, set_track=True)
    assert pending.accepted.ok
    assert (await h.link.function_level_reset(vhca)).ok
    c = await h.completion(pending)
    assert (c.status, c.syndrome) == (CmdStatus.INT_ERR, Syndrome.ABORTED)
    assert c.token == pending.accepted.token
    assert (await h.info(vhca)).save_in_flight is False
    again = await h.save(vhca, size, set_track=True)
    assert again.accepted.ok, again.accepted
    await h.advance(1.0)
    assert (await h.completion(again)).status == 0
    await h.advance(5.0)
    await h.barrier()
    assert len(pending.completions) == 1


async def test_flr_ends_a_chunked_save(h):
    """FLR ends a chunked save: its continuation is refused afterwards."""
    vhca = await h.vf(size=256 * KiB, chunk_size=64 * KiB)
    await h.suspend_fully(vhca)
    q = await h.query(vhca, chunk=True)
    c, _ = await h.save_done(vhca, q.required_umem_size)
    assert c.next_required_umem_size > 0
    assert (await h.link.function_level_reset(vhca)).ok
    await h.suspend_fully(vhca)
    pending = await h.save(vhca, c.next_required_umem_size, incremental=True)
    assert (pending.accepted.status, pending.accepted.syndrome) == (
        CmdStatus.BAD_RES_STATE_ERR,
        Syndrome.NO_TRACKING,
    )


async def test_flr_ends_the_load_chain(h):
    """FLR ends the load chain: the next incremental image has nothing to follow."""
    src = await h.vf(size=64 * KiB)
    dst = await h.vf(size=64 * KiB)
    images = [await h.save_ok(src, (await h.query(src)).required_umem_size, set_track=True)]
    await h.advance(0.5)
    await h.suspend_fully(src)
    q = await h.query(src, incremental=True)
    images.append(await h.save_ok(src, q.required_umem_size, incremental=True))
    await h.suspend_fully(dst)
    assert (await h.load(dst, images[0])).ok
    assert (await h.link.function_level_reset(dst)).ok
    await h.suspend_fully(dst)
    res = await h.load(dst, images[1])
    assert (res.status, res.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.IMAGE_OUT_OF_ORDER)


async def test_flr_of_an_unknown_vf_is_bad_param(h):
    """FLR of a function that does not exist is BAD_PARAM."""
    await h.vf(size=64 * KiB)
    for vhca in (5, 0x10000):
        res = await h.link.function_level_reset(vhca)
        assert res.status == CmdStatus.BAD_PARAM_ERR, res
