"""QUERY_VHCA_MIGRATION_STATE: image sizes, migration_state, chunk mode."""

from __future__ import annotations

from fwemu.link.ifc import PAGE_SIZE, CmdStatus, KiB, MiB, QueryVhcaMigState, Syndrome, VfCaps
from fwemu.model.image import IMAGE_HEADER_SIZE

UNINITIALIZED = QueryVhcaMigState.UNINITIALIZED
IDLE = QueryVhcaMigState.OPER_MIGRATION_IDLE
READY = QueryVhcaMigState.OPER_MIGRATION_READY
DIRTY = QueryVhcaMigState.OPER_MIGRATION_DIRTY
INIT = QueryVhcaMigState.OPER_MIGRATION_INIT


async def start_tracking(h, vhca: int) -> bytes:
    """RUNNING -> PRE_COPY: QUERY, then a full tracked SAVE of that size."""
    q = await h.query(vhca)
    assert q.ok, q
    return await h.save_ok(vhca, q.required_umem_size, set_track=True)


def test_migration_state_values_match_the_series():
    """4bee09a5: UNINITIALIZED 0, IDLE 1, READY 2, DIRTY 3, INIT 4."""
    assert [int(v) for v in (UNINITIALIZED, IDLE, READY, DIRTY, INIT)] == [0, 1, 2, 3, 4]


async def test_non_incremental_query_is_the_full_image_size(h):
    """QUERY(incremental=0) reports the full image: a final SAVE into a buffer of
    exactly that size takes all of it.  (The firmware may leave a little slack
    for the alignment padding of large records: at most a page per record.)"""
    vhca = await h.vf(size=512 * KiB)
    await h.suspend_fully(vhca)
    q = await h.query(vhca)
    assert q.ok, q
    assert q.remaining_total_size == 0  # chunk mode only
    img = await h.save_ok(vhca, q.required_umem_size)
    assert 512 * KiB + IMAGE_HEADER_SIZE < len(img) <= q.required_umem_size
    assert q.required_umem_size - len(img) <= 4 * KiB + 16


async def test_full_size_grows_with_a_reconfiguration(h):
    """A reconfiguration appends objects: the full image grows by at least their bytes."""
    vhca = await h.vf(size=128 * KiB, reconfig_bytes=32 * KiB)
    before = (await h.query(vhca)).required_umem_size
    await h.link.reconfigure(vhca)
    after = (await h.query(vhca)).required_umem_size
    assert after - before >= 32 * KiB


async def test_incremental_query_without_tracking_reports_the_full_size(h):
    """Without a tracking session everything would have to be sent."""
    vhca = await h.vf(size=128 * KiB)
    full = await h.query(vhca)
    inc = await h.query(vhca, incremental=True)
    assert inc.ok, inc
    assert inc.required_umem_size == full.required_umem_size


async def test_incremental_query_is_zero_when_nothing_changed(h):
    """Right after a tracked SAVE nothing changed: 0, so mlx5vf issues no SAVE
    and its dirty_bytes can reach 0 (the temporary end of stream)."""
    vhca = await h.vf(size=256 * KiB, dirty_bytes_per_s=256 * KiB)
    await start_tracking(h, vhca)
    q = await h.query(vhca, incremental=True)
    assert q.ok, q
    assert q.required_umem_size == 0
    assert q.migration_state == IDLE


async def test_incremental_query_grows_with_the_workload(h):
    """incremental = what changed since the last tracked SAVE: grows while the
    workload dirties pages, and falls back to the header once it was saved."""
    vhca = await h.vf(size=1 * MiB, dirty_bytes_per_s=64 * KiB)
    await start_tracking(h, vhca)
    sizes = []
    for _ in range(3):
        await h.advance(0.25)
        q = await h.query(vhca, incremental=True)
        assert q.ok and q.migration_state == DIRTY, q
        sizes.append(q.required_umem_size)
    assert IMAGE_HEADER_SIZE < sizes[0] < sizes[1] < sizes[2]
    # 0.75 s at 64 KiB/s is 12 page writes: at most 12 pages plus record headers.
    assert sizes[2] <= IMAGE_HEADER_SIZE + 12 * (4 * KiB + 16)
    img = await h.save_ok(vhca, sizes[2], incremental=True, set_track=True)
    assert IMAGE_HEADER_SIZE < len(img) <= sizes[2]
    q = await h.query(vhca, incremental=True)
    assert (q.required_umem_size, q.migration_state) == (0, IDLE)


async def test_migration_state_follows_the_readme_table(h):
    """UNINITIALIZED: no tracking, not fully suspended; IDLE: tracking, nothing
    changed; DIRTY: tracking, pages dirtied; INIT: tracking and a reconfiguration
    no tracked SAVE captured (wins over DIRTY); READY: no tracking, fully
    suspended."""
    vhca = await h.vf(size=256 * KiB, dirty_bytes_per_s=128 * KiB)
    assert await h.mig_state(vhca) == UNINITIALIZED
    await h.advance(0.5)
    assert await h.mig_state(vhca) == UNINITIALIZED  # dirtying without tracking
    await start_tracking(h, vhca)
    assert await h.mig_state(vhca) == IDLE
    await h.advance(0.5)
    assert await h.mig_state(vhca) == DIRTY
    await h.link.reconfigure(vhca)
    assert await h.mig_state(vhca) == INIT
    await h.advance(0.5)
    assert await h.mig_state(vhca) == INIT  # INIT wins over DIRTY
    # PRE_COPY -> PRE_COPY_P2P -> STOP_COPY, final incremental SAVE ends tracking.
    await h.suspend_fully(vhca)
    assert await h.mig_state(vhca) == INIT  # still tracking
    q = await h.query(vhca, incremental=True)
    await h.save_ok(vhca, q.required_umem_size, incremental=True)
    assert await h.mig_state(vhca) == READY
    await h.resume(vhca, 0)
    assert await h.mig_state(vhca) == UNINITIALIZED  # initiator still suspended
    await h.resume(vhca, 1)
    assert await h.mig_state(vhca) == UNINITIALIZED


async def test_fully_suspended_vf_without_tracking_is_ready(h):
    """READY needs the VF fully suspended; initiator only is still UNINITIALIZED."""
    vhca = await h.vf(size=64 * KiB)
    assert (await h.suspend(vhca, 0)).ok
    assert await h.mig_state(vhca) == UNINITIALIZED
    assert (await h.suspend(vhca, 1)).ok
    assert await h.mig_state(vhca) == READY


async def test_init_returns_to_idle_or_dirty_once_a_tracked_save_captured_it(h):
    """INIT is cleared by the incremental tracked SAVE that captures the new
    initial data; then the VF is IDLE, or DIRTY once the workload ran again."""
    vhca = await h.vf(size=256 * KiB, dirty_bytes_per_s=128 * KiB)
    await start_tracking(h, vhca)
    await h.advance(0.2)
    await h.link.reconfigure(vhca, [("CQ", 8 * KiB)])
    q = await h.query(vhca, incremental=True)
    assert q.migration_state == INIT
    await h.save_ok(vhca, q.required_umem_size, incremental=True, set_track=True)
    assert await h.mig_state(vhca) == IDLE
    await h.advance(0.2)
    assert await h.mig_state(vhca) == DIRTY


async def test_reconfiguration_during_tracking_adds_its_bytes_to_the_incremental_size(h):
    """A reconfiguration's new initial data is part of the next incremental image."""
    vhca = await h.vf(size=256 * KiB, dirty_bytes_per_s=0)
    await start_tracking(h, vhca)
    assert (await h.query(vhca, incremental=True)).required_umem_size == 0
    await h.link.reconfigure(vhca, [("QP", 40 * KiB)])
    q = await h.query(vhca, incremental=True)
    assert q.migration_state == INIT
    assert q.required_umem_size >= IMAGE_HEADER_SIZE + 40 * KiB


async def test_vf_without_the_migration_state_cap_always_reports_0(h):
    """A VF without cap_2.migration_state always reports 0, so it never causes a
    REINIT: running, tracking clean or dirty, after a reconfiguration, fully
    suspended."""
    vhca = await h.vf(
        size=256 * KiB, dirty_bytes_per_s=128 * KiB, caps=VfCaps(migration_state=False)
    )
    seen = [await h.mig_state(vhca)]
    await start_tracking(h, vhca)
    seen.append(await h.mig_state(vhca))
    await h.advance(0.5)
    seen.append(await h.mig_state(vhca))
    await h.link.reconfigure(vhca)
    seen.append(await h.mig_state(vhca))
    q = await h.query(vhca, incremental=True)
    assert q.required_umem_size > 256 * KiB // 8  # tracking works, only the field is 0
    await h.suspend_fully(vhca)
    seen.append(await h.mig_state(vhca))
    q = await h.query(vhca, incremental=True)
    await h.save_ok(vhca, q.required_umem_size, incremental=True)
    seen.append(await h.mig_state(vhca))
    assert seen == [0] * 6
    info = await h.info(vhca)
    assert info.reconfigurations == 1


async def test_chunk_query_caps_required_size_at_chunk_size(h):
    """QUERY(chunk=1): required_umem_size <= chunk_size, remaining_total_size is
    the whole image in pieces (test_chunk checks it is their exact sum)."""
    vhca = await h.vf(size=512 * KiB, chunk_size=64 * KiB)
    full = (await h.query(vhca)).required_umem_size
    q = await h.query(vhca, chunk=True)
    assert q.ok, q
    assert q.required_umem_size == 64 * KiB
    # Pieces carry their own headers, the one image an alignment PAD record
    # (up to a page): the two sizes are close.
    assert abs(q.remaining_total_size - full) < 16 * (IMAGE_HEADER_SIZE + 16) + PAGE_SIZE + 16


async def test_chunk_query_of_an_image_smaller_than_a_chunk(h):
    """An image smaller than chunk_size is one piece: required = remaining_total_size."""
    vhca = await h.vf(size=64 * KiB, chunk_size=1 * MiB)
    full = (await h.query(vhca)).required_umem_size
    q = await h.query(vhca, chunk=True)
    assert q.ok, q
    assert q.required_umem_size == q.remaining_total_size
    assert full <= q.remaining_total_size < 1 * MiB


async def test_chunk_query_without_the_cap_is_chunks_unsupported(h):
    """QUERY(chunk=1) without cap_2.migration_in_chunks is BAD_PARAM / CHUNKS_UNSUPPORTED."""
    vhca = await h.vf(size=64 * KiB, caps=VfCaps(migration_in_chunks=False))
    q = await h.query(vhca, chunk=True)
    assert (q.status, q.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.CHUNKS_UNSUPPORTED)
    # The plain query still works.
    assert (await h.query(vhca)).ok


async def test_query_with_op_mod_not_0_is_bad_param(h):
    """QUERY_VHCA_MIGRATION_STATE op_mod must be 0 (BAD_PARAM / BAD_OP_MOD)."""
    vhca = await h.vf(size=64 * KiB)
    q = await h.query(vhca, op_mod=1)
    assert (q.status, q.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.BAD_OP_MOD)
