"""SAVE_VHCA_STATE: asynchronous completion, tracking, sizes and refusals."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwemu.link.ifc import PAGE_SIZE, CmdStatus, KiB, MiB, QueryVhcaMigState, Syndrome
from fwemu.model.image import IMAGE_HEADER_SIZE

# These tests move image bytes: run them with firmware-held memory too.
pytestmark = pytest.mark.remote_memory

BAD_PARAM = CmdStatus.BAD_PARAM_ERR
BAD_RES_STATE = CmdStatus.BAD_RES_STATE_ERR


def pages(n: int) -> int:
    """A buffer size as mlx5vf allocates it: whole pages."""
    return -(-n // PAGE_SIZE) * PAGE_SIZE


async def test_save_is_accepted_at_once_and_completes_after_latency_plus_transfer(h):
    """SAVE is asynchronous: accepted with status 0 and a token; the completion
    follows save_latency_s + size / save_bandwidth later, not earlier.

    (A 128 KiB VF: its image fills the buffer exactly, so `size` and
    actual_image_size are the same number here.)"""
    vhca = await h.vf(
        size=128 * KiB, dirty_bytes_per_s=0, save_latency_s=0.5, save_bandwidth=1 * MiB
    )
    await h.suspend_fully(vhca)
    size = (await h.query(vhca)).required_umem_size
    t0 = await h.link.now()
    pending = await h.save(vhca, size)
    assert pending.accepted.status == CmdStatus.OK, pending.accepted
    assert pending.accepted.token != 0
    due = t0 + 0.5 + size / MiB
    await h.advance(due - t0 - 0.001)
    info = await h.info(vhca)
    assert info.save_in_flight is True
    assert not pending.future.done()
    await h.advance(0.002)
    c = await h.completion(pending)
    assert c.status == CmdStatus.OK, c
    assert c.token == pending.accepted.token
    assert c.vhca_id == vhca
    assert c.actual_image_size == size
    assert c.timestamp == pytest.approx(due, abs=1e-6)
    assert (await h.info(vhca)).save_in_flight is False
    assert len(pending.completions) == 1


async def test_the_image_is_in_host_memory_as_of_the_command(h):
    """The image is written into host memory when the SAVE is accepted, as of
    that moment: it is there before the completion, and the workload running
    until the completion does not change it."""
    src = await h.vf(size=128 * KiB, dirty_bytes_per_s=256 * KiB, save_latency_s=1.0)
    dst = await h.vf(size=128 * KiB)
    size = (await h.query(src)).required_umem_size
    digest_at_save = await h.digest(src)
    pending = await h.save(src, size, set_track=True)
    assert pending.accepted.ok, pending.accepted
    await h.link.dma_sync_for_cpu(pending.buf, 0, size)
    early = bytes(pending.buf.view[:size])
    assert early[:4] == b"VHCA"
    await h.advance(1.0)
    assert await h.digest(src) != digest_at_save  # the workload ran meanwhile
    c = await h.completion(pending)
    assert c.status == 0, c
    img = await h.image(pending, c)
    assert img == early[: c.actual_image_size]
    await h.suspend_fully(dst)
    assert (await h.load(dst, img)).ok
    assert await h.digest(dst) == digest_at_save


async def test_second_save_while_one_is_in_flight_is_res_busy(h):
    """One SAVE at a time per VF: a second gets RES_BUSY (0x6) and nothing
    waits; after the completion the VF takes a SAVE again."""
    vhca = await h.vf(size=64 * KiB, save_latency_s=0.3)
    size = (await h.query(vhca)).required_umem_size
    first = await h.save(vhca, size, set_track=True)
    assert first.accepted.ok
    second = await h.save(vhca, size, incremental=True, set_track=True)
    assert (second.accepted.status, second.accepted.syndrome) == (
        CmdStatus.RES_BUSY,
        Syndrome.SAVE_IN_FLIGHT,
    )
    assert second.accepted.status == 0x6
    await h.advance(0.3)
    assert (await h.completion(first)).status == 0
    third = await h.save(vhca, size, incremental=True, set_track=True)
    assert third.accepted.ok, third.accepted
    await h.advance(0.3)
    assert (await h.completion(third)).status == 0
    await h.barrier()
    assert not second.future.done()  # a refused SAVE never completes


async def test_suspend_while_a_save_is_in_flight_is_res_busy(h):
    """mlx5vf waits on its save semaphore before SUSPEND because the firmware
    refuses it with RES_BUSY while a SAVE is in flight."""
    vhca = await h.vf(size=64 * KiB, save_latency_s=0.2)
    size = (await h.query(vhca)).required_umem_size
    pending = await h.save(vhca, size, set_track=True)
    res = await h.suspend(vhca, 0)
    assert (res.status, res.syndrome) == (CmdStatus.RES_BUSY, Syndrome.SAVE_IN_FLIGHT)
    assert (await h.info(vhca)).initiator_suspended is False
    await h.advance(0.2)
    await h.completion(pending)
    assert (await h.suspend(vhca, 0)).ok


async def test_load_while_a_save_is_in_flight_is_res_busy(h):
    """LOAD waits for nothing: refused with RES_BUSY while a SAVE is in flight, the VF unchanged."""
    vhca = await h.vf(size=64 * KiB, save_latency_s=0.2)
    other = await h.vf(size=64 * KiB)
    await h.suspend_fully(other)
    await h.suspend_fully(vhca)
    img = await h.save_ok(other, (await h.query(other)).required_umem_size)
    pending = await h.save(vhca, (await h.query(vhca)).required_umem_size)
    assert pending.accepted.ok
    before = await h.digest(vhca)
    res = await h.load(vhca, img)
    assert (res.status, res.syndrome) == (CmdStatus.RES_BUSY, Syndrome.SAVE_IN_FLIGHT)
    assert await h.digest(vhca) == before
    await h.advance(0.2)
    await h.completion(pending)
    assert (await h.load(vhca, img)).ok
    assert await h.digest(vhca) == await h.digest(other)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(fraction=st.floats(0.0, 2.0), extra=st.integers(0, 5000))
async def test_actual_image_size_never_exceeds_size(h, fraction, extra):
    """Property: a tracked SAVE of any buffer size either completes with
    actual_image_size <= size, or is refused as BUFFER_TOO_SMALL (a full image
    needs at least its object table)."""
    vhca = await h.vf(size=64 * KiB, dirty_bytes_per_s=0)
    full = (await h.query(vhca)).required_umem_size
    size = max(1, int(full * fraction) + extra)
    pending = await h.save(vhca, size, set_track=True)
    if pending.accepted.ok:
        await h.advance(0)
        c = await h.completion(pending)
        assert c.status == 0, c
        assert IMAGE_HEADER_SIZE < c.actual_image_size <= size
        if size >= full:
            assert (await h.query(vhca, incremental=True)).required_umem_size == 0
    else:
        assert (pending.accepted.status, pending.accepted.syndrome) == (
            BAD_PARAM,
            Syndrome.BUFFER_TOO_SMALL,
        )
        assert size < 1 * KiB
    await h.link.remove_vf(vhca)


async def test_tracked_partial_save_succeeds_and_leaves_the_rest_pending(h):
    """Tracked SAVEs write as much as fits and leave the rest pending: what did
    not fit is reported by the next incremental query, and the images still
    migrate the VF."""
    src = await h.vf(size=256 * KiB, dirty_bytes_per_s=0)
    dst = await h.vf(size=256 * KiB)
    full = (await h.query(src)).required_umem_size
    small = full // 3
    c, img0 = await h.save_done(src, small, set_track=True)
    assert c.status == 0, c
    assert IMAGE_HEADER_SIZE < c.actual_image_size <= small
    q = await h.query(src, incremental=True)
    assert q.ok and q.migration_state == QueryVhcaMigState.OPER_MIGRATION_DIRTY
    # The rest: about what did not fit (a header and a record header more).
    assert c.actual_image_size + q.required_umem_size >= full - PAGE_SIZE
    assert q.required_umem_size > full - small - PAGE_SIZE
    img1 = await h.save_ok(src, q.required_umem_size, incremental=True, set_track=True)
    q = await h.query(src, incremental=True)
    assert (q.required_umem_size, q.migration_state) == (0, QueryVhcaMigState.OPER_MIGRATION_IDLE)
    await h.suspend_fully(src)
    q = await h.query(src, incremental=True)
    assert q.required_umem_size == 0  # nothing left: the final image is empty
    img2 = await h.save_ok(src, PAGE_SIZE, incremental=True)
    await h.suspend_fully(dst)
    for img in (img0, img1, img2):
        res = await h.load(dst, img)
        assert res.ok, res
    assert await h.digest(dst) == await h.digest(src)


async def test_final_full_image_too_small_is_buffer_too_small(h):
    """Outside chunk mode a final image must fit whole: BAD_PARAM /
    BUFFER_TOO_SMALL, and nothing is written."""
    vhca = await h.vf(size=64 * KiB)
    await h.suspend_fully(vhca)
    full = (await h.query(vhca)).required_umem_size
    pending = await h.save(vhca, full - 1)
    assert (pending.accepted.status, pending.accepted.syndrome) == (
        BAD_PARAM,
        Syndrome.BUFFER_TOO_SMALL,
    )
    await h.link.dma_sync_for_cpu(pending.buf, 0, full - 1)
    assert bytes(pending.buf.view[: full - 1]) == bytes(full - 1)
    # The VF is still ready for a final SAVE that fits.
    assert await h.mig_state(vhca) == QueryVhcaMigState.OPER_MIGRATION_READY
    assert len(await h.save_ok(vhca, full)) <= full


async def test_final_incremental_image_too_small_is_buffer_too_small(h):
    """Outside chunk mode the final incremental image must fit whole: BUFFER_TOO_SMALL."""
    vhca = await h.vf(size=128 * KiB, dirty_bytes_per_s=64 * KiB)
    await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    await h.advance(0.5)
    await h.suspend_fully(vhca)
    q = await h.query(vhca, incremental=True)
    assert q.required_umem_size > IMAGE_HEADER_SIZE + PAGE_SIZE
    pending = await h.save(vhca, q.required_umem_size - 1, incremental=True)
    assert (pending.accepted.status, pending.accepted.syndrome) == (
        BAD_PARAM,
        Syndrome.BUFFER_TOO_SMALL,
    )


async def test_refused_final_incremental_save_keeps_the_tracking_session(h):
    """A command refused with BAD_PARAM changes nothing: the driver can retry the
    final incremental SAVE with a buffer that fits."""
    vhca = await h.vf(size=128 * KiB, dirty_bytes_per_s=64 * KiB)
    await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    await h.advance(0.5)
    await h.suspend_fully(vhca)
    q = await h.query(vhca, incremental=True)
    assert q.migration_state == QueryVhcaMigState.OPER_MIGRATION_DIRTY
    refused = await h.save(vhca, q.required_umem_size - 1, incremental=True)
    assert refused.accepted.syndrome == Syndrome.BUFFER_TOO_SMALL
    assert await h.mig_state(vhca) == QueryVhcaMigState.OPER_MIGRATION_DIRTY
    retry = await h.save(vhca, q.required_umem_size, incremental=True)
    assert retry.accepted.ok, retry.accepted


async def test_unknown_mkey_is_bad_res(h):
    """An unknown mkey is BAD_RES (0x5) / UNKNOWN_MKEY."""
    vhca = await h.vf(size=64 * KiB)
    pending = await h.save(vhca, 4096, set_track=True, mkey=0x7777_7700)
    assert (pending.accepted.status, pending.accepted.syndrome) == (
        CmdStatus.BAD_RES_ERR,
        Syndrome.UNKNOWN_MKEY,
    )
    assert pending.accepted.status == 0x5


async def test_freed_buffer_mkey_is_unknown(h):
    """A freed buffer's mkey is gone: BAD_RES."""
    vhca = await h.vf(size=64 * KiB)
    buf = await h.buffer(128 * KiB)
    await h.link.free_buffer(buf)
    pending = await h.save(vhca, 128 * KiB, set_track=True, mkey=buf.mkey)
    assert pending.accepted.status == CmdStatus.BAD_RES_ERR


@pytest.mark.parametrize("size", [0, 1 << 32, (1 << 32) + 4096])
@pytest.mark.parametrize("track", [True, False])
async def test_size_0_or_above_32_bits_is_bad_param(h, size, track):
    """size must be 1..2^32-1 (a 32-bit field); size 0 is only accepted for the
    pre-copy cleanup (untracked SAVE on a running VF)."""
    vhca = await h.vf(size=64 * KiB)
    if not track:
        await h.suspend_fully(vhca)  # a final SAVE, not the cleanup
    buf = await h.buffer(64 * KiB)
    pending = await h.save(vhca, size, set_track=track, buf=buf)
    assert (pending.accepted.status, pending.accepted.syndrome) == (BAD_PARAM, Syndrome.BAD_SIZE)


@pytest.mark.parametrize(
    ("va", "size"), [(0, 128 * KiB + 1), (4096, 128 * KiB), (64 * KiB, 64 * KiB + 1), (1 << 40, 1)]
)
async def test_range_beyond_the_mkey_is_bad_param(h, va, size):
    """va + size must lie inside the 128 KiB mkey: BAD_PARAM / MKEY_RANGE."""
    vhca = await h.vf(size=64 * KiB)
    buf = await h.buffer(128 * KiB)
    pending = await h.save(vhca, size, va=va, buf=buf, set_track=True)
    assert (pending.accepted.status, pending.accepted.syndrome) == (BAD_PARAM, Syndrome.MKEY_RANGE)


async def test_save_writes_at_va_inside_the_mkey(h):
    """va is the offset inside the mkey: the image starts there and the bytes
    before it are untouched."""
    src = await h.vf(size=64 * KiB)
    dst = await h.vf(size=64 * KiB)
    await h.suspend_fully(src)
    size = (await h.query(src)).required_umem_size
    buf = await h.buffer(8192 + size)
    c, img = await h.save_done(src, size, buf=buf, va=8192)
    assert c.status == 0
    await h.link.dma_sync_for_cpu(buf, 0, 8192)
    assert bytes(buf.view[:8192]) == bytes(8192)
    assert img[:4] == b"VHCA"
    await h.suspend_fully(dst)
    assert (await h.load(dst, img)).ok
    assert await h.digest(dst) == await h.digest(src)


@pytest.mark.parametrize("set_track", [True, False])
async def test_incremental_without_tracking_is_no_tracking(h, set_track):
    """An incremental SAVE without a tracking session: BAD_RES_STATE (0x9) /
    NO_TRACKING, for the tracked and the final form."""
    vhca = await h.vf(size=64 * KiB)
    if not set_track:
        await h.suspend_fully(vhca)
    pending = await h.save(vhca, 128 * KiB, incremental=True, set_track=set_track)
    assert (pending.accepted.status, pending.accepted.syndrome) == (
        BAD_RES_STATE,
        Syndrome.NO_TRACKING,
    )


@pytest.mark.parametrize("with_buffer", [False, True])
async def test_untracked_full_save_on_a_running_vf_is_the_precopy_cleanup(h, with_buffer):
    """SAVE(incremental=0, set_track=0) on a VF not fully suspended is mlx5vf's
    pre-copy cleanup: it ends tracking, writes nothing (actual_image_size 0) and
    migration_state goes back to UNINITIALIZED; size 0 / mkey 0 are accepted."""
    vhca = await h.vf(size=64 * KiB, dirty_bytes_per_s=64 * KiB)
    await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    await h.advance(0.5)
    assert await h.mig_state(vhca) == QueryVhcaMigState.OPER_MIGRATION_DIRTY
    assert (await h.info(vhca)).tracking is True
    if with_buffer:
        size = (await h.query(vhca, incremental=True)).required_umem_size
        pending = await h.save(vhca, size)
    else:
        pending = await h.save(vhca, 0, mkey=0)
    assert pending.accepted.ok, pending.accepted
    await h.advance(0)
    c = await h.completion(pending)
    assert (c.status, c.actual_image_size) == (0, 0)
    if with_buffer:
        await h.link.dma_sync_for_cpu(pending.buf, 0, pending.buf.length)
        assert bytes(pending.buf.view) == bytes(pending.buf.length)
    assert (await h.info(vhca)).tracking is False
    assert await h.mig_state(vhca) == QueryVhcaMigState.UNINITIALIZED
    pending = await h.save(vhca, 4096, incremental=True, set_track=True)
    assert pending.accepted.syndrome == Syndrome.NO_TRACKING


async def test_cleanup_also_works_with_only_the_initiator_suspended(h):
    """PRE_COPY_P2P -> RUNNING_P2P: the VF is not fully suspended, so an
    untracked full SAVE is the cleanup there too."""
    vhca = await h.vf(size=64 * KiB)
    await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    assert (await h.suspend(vhca, 0)).ok
    c, _ = await h.save_done(vhca, 0, mkey=0)
    assert (c.status, c.actual_image_size) == (0, 0)
    assert (await h.info(vhca)).tracking is False


async def test_size_0_is_refused_for_a_tracked_save(h):
    """size 0 and mkey 0 are accepted for the pre-copy cleanup only."""
    vhca = await h.vf(size=64 * KiB)
    pending = await h.save(vhca, 0, mkey=0, set_track=True)
    assert (pending.accepted.status, pending.accepted.syndrome) == (BAD_PARAM, Syndrome.BAD_SIZE)


async def test_tracked_save_on_a_fully_suspended_vf_is_refused(h):
    """Tracking cannot start or continue on a suspended function."""
    vhca = await h.vf(size=64 * KiB)
    await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    await h.suspend_fully(vhca)
    for inc in (False, True):
        pending = await h.save(vhca, 128 * KiB, incremental=inc, set_track=True)
        assert (pending.accepted.status, pending.accepted.syndrome) == (
            BAD_RES_STATE,
            Syndrome.NOT_RUNNING,
        )


async def test_final_incremental_save_needs_the_vf_fully_suspended(h):
    """A final (untracked) incremental SAVE needs the VF fully suspended: BAD_RES_STATE /
    NOT_SUSPENDED, tracking goes on."""
    vhca = await h.vf(size=64 * KiB)
    await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    assert (await h.suspend(vhca, 0)).ok
    pending = await h.save(vhca, 128 * KiB, incremental=True)
    assert (pending.accepted.status, pending.accepted.syndrome) == (
        BAD_RES_STATE,
        Syndrome.NOT_SUSPENDED,
    )
    assert (await h.info(vhca)).tracking is True


async def test_tracked_save_sized_by_an_earlier_query_survives_new_dirty_pages(h):
    """mlx5vf sizes the precopy SAVE buffer from QUERY(incremental) rounded up to
    pages; the device runs in between, so the SAVE must take what fits and
    leave the rest dirty."""
    vhca = await h.vf(size=256 * KiB, dirty_bytes_per_s=8 * KiB)
    await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    await h.advance(0.5)  # one page write
    q = await h.query(vhca, incremental=True)
    assert 0 < q.required_umem_size <= PAGE_SIZE + 200
    await h.advance(2.0)  # the guest dirties more pages between QUERY and SAVE
    size = pages(q.required_umem_size)
    pending = await h.save(vhca, size, incremental=True, set_track=True)
    assert pending.accepted.ok, pending.accepted
    await h.advance(0)
    c = await h.completion(pending)
    assert c.status == 0
    assert 0 < c.actual_image_size <= size
    assert await h.mig_state(vhca) == QueryVhcaMigState.OPER_MIGRATION_DIRTY
    assert (await h.query(vhca, incremental=True)).required_umem_size > 0


async def test_a_refused_tracked_save_does_not_break_the_image_chain(h):
    """A refused command changes nothing: the images of the accepted SAVEs load
    in order on the target and reproduce the source."""
    src = await h.vf(size=256 * KiB, dirty_bytes_per_s=64 * KiB)
    dst = await h.vf(size=256 * KiB)
    images = [await h.save_ok(src, (await h.query(src)).required_umem_size, set_track=True)]
    await h.advance(0.2)
    refused = await h.save(src, 60, incremental=True, set_track=True)
    if refused.accepted.ok:  # a firmware that writes an empty image is fine too
        await h.advance(0)
        images.append(await h.image(refused, await h.completion(refused)))
    q = await h.query(src, incremental=True)
    assert q.required_umem_size > 0  # the refused or empty SAVE left the dirty pages
    images.append(await h.save_ok(src, q.required_umem_size, incremental=True, set_track=True))
    await h.suspend_fully(src)
    q = await h.query(src, incremental=True)
    images.append(await h.save_ok(src, max(PAGE_SIZE, q.required_umem_size), incremental=True))
    await h.suspend_fully(dst)
    for img in images:
        res = await h.load(dst, img)
        assert res.ok, res
    assert await h.digest(dst) == await h.digest(src)


async def test_incremental_save_takes_new_initial_data_before_dirty_pages(h):
    """SAVE(incremental=1, set_track=1) writes new initial data first, then dirty
    pages: a buffer one byte short of the whole incremental image leaves the last
    dirty page pending, and INIT is gone (DIRTY)."""
    vhca = await h.vf(size=256 * KiB, dirty_bytes_per_s=8 * KiB)
    await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    await h.advance(0.5)  # one page write
    assert await h.mig_state(vhca) == QueryVhcaMigState.OPER_MIGRATION_DIRTY
    await h.link.reconfigure(vhca, [("QP", 64 * KiB)])
    q = await h.query(vhca, incremental=True)
    assert q.migration_state == QueryVhcaMigState.OPER_MIGRATION_INIT
    c, _ = await h.save_done(vhca, q.required_umem_size - 1, incremental=True, set_track=True)
    assert c.status == 0, c
    assert await h.mig_state(vhca) == QueryVhcaMigState.OPER_MIGRATION_DIRTY
    rest = await h.query(vhca, incremental=True)
    assert rest.required_umem_size == IMAGE_HEADER_SIZE + 16 + PAGE_SIZE
