"""A whole live migration by hand, command by command, as mlx5vf drives it:
PRE_COPY with a live workload and reconfigurations (REINIT), STOP_COPY, then
LOAD of every image on the target."""

from __future__ import annotations

import pytest

from fwemu.link.ifc import PAGE_SIZE, CmdStatus, Fault, FaultKind, KiB, QueryVhcaMigState, Syndrome

# These tests move image bytes: run them with firmware-held memory too.
pytestmark = pytest.mark.remote_memory

CHUNK = 64 * KiB
INIT = QueryVhcaMigState.OPER_MIGRATION_INIT


def pages(n: int) -> int:
    """A driver's buffer for n bytes: whole pages, at least one (mlx5vf sizes
    the final SAVE's buffer like this even when the query says 0)."""
    return max(PAGE_SIZE, -(-n // PAGE_SIZE) * PAGE_SIZE)


async def final_images(h, vhca: int, *, chunk: bool) -> list[bytes]:
    """PRE_COPY_P2P -> STOP_COPY: QUERY(INC|FINAL) and the final incremental
    SAVE (in chunk mode: piece after piece until next_required_umem_size is 0)."""
    q = await h.query(vhca, incremental=True, chunk=chunk)
    assert q.ok, q
    size, images = pages(q.required_umem_size), []
    while True:
        c, img = await h.save_done(vhca, size, incremental=True)
        assert c.status == 0, c
        images.append(img)
        if not chunk:
            assert c.next_required_umem_size == 0
        if c.next_required_umem_size == 0:
            return images
        size = c.next_required_umem_size


async def stop_copy_and_load(h_src, src: int, h_dst, dst: int, images: list[bytes]) -> None:
    """STOP_COPY: suspend the source, add its final image to its precopy
    `images`; LOAD them all on the suspended target: it reproduces the source."""
    await h_src.suspend_fully(src)
    images = images + await final_images(h_src, src, chunk=False)
    await h_dst.suspend_fully(dst)
    for img in images:
        assert (await h_dst.load(dst, img)).ok
    assert await h_dst.digest(dst) == await h_src.digest(src)


@pytest.mark.parametrize("trigger", ["now", "after_saved_bytes"])
@pytest.mark.parametrize("chunk", [False, True], ids=["whole", "chunks"])
async def test_live_migration_by_hand_reproduces_the_source(h, chunk, trigger):
    """Two VFs with a live workload.  Source: full tracked SAVE, time passes,
    a reconfiguration (migration_state INIT seen), incremental tracked SAVEs,
    SUSPEND initiator then responder, final incremental SAVE.  Target (fully
    suspended): LOAD of every image in order.  The target's digest equals the
    source's read after its suspension.

    In chunk mode the buffers are sized as mlx5vf sizes them (QUERY(chunk=1),
    so precopy SAVEs take at most a chunk and leave the rest pending) and the
    final image comes in pieces."""
    src = await h.vf(
        size=512 * KiB,
        dirty_bytes_per_s=128 * KiB,
        chunk_size=CHUNK,
        reconfig_bytes=96 * KiB,
    )
    dst = await h.vf(size=512 * KiB, dirty_bytes_per_s=128 * KiB)
    await h.advance(0.5)  # both run their workload

    # RUNNING -> PRE_COPY: QUERY, SAVE(incremental=0, set_track=1).
    q = await h.query(src, chunk=chunk)
    assert q.ok, q
    if trigger == "after_saved_bytes":
        await h.link.reconfigure(src, after_saved_bytes=q.required_umem_size // 2)
    size = max(q.required_umem_size, CHUNK) if chunk else pages(q.required_umem_size * 11 // 10)
    images = [await h.save_ok(src, size, set_track=True)]

    # PRE_COPY iterations: GET_PRECOPY_INFO -> QUERY(INC) -> SAVE(inc=1, track=1).
    states = []
    for n in range(30 if chunk else 4):
        await h.advance(0.05)
        if trigger == "now" and n == 1:
            await h.link.reconfigure(src)
        q = await h.query(src, incremental=True, chunk=chunk)
        assert q.ok, q
        states.append(q.migration_state)
        images.append(
            await h.save_ok(src, pages(q.required_umem_size), incremental=True, set_track=True)
        )
    assert INIT in states  # the reconfiguration asked for a REINIT
    assert states[-1] != INIT  # ... and a tracked SAVE captured it
    assert (await h.info(src)).reconfigurations == 1

    # PRE_COPY -> PRE_COPY_P2P -> STOP_COPY.
    assert (await h.suspend(src, 0)).ok
    await h.advance(0.1)
    assert (await h.suspend(src, 1)).ok
    source_digest = await h.digest(src)
    finals = await final_images(h, src, chunk=chunk)
    if chunk:
        assert len(finals) >= 1
    images += finals
    assert await h.mig_state(src) == QueryVhcaMigState.OPER_MIGRATION_READY

    # Target: RUNNING -> RUNNING_P2P -> STOP -> RESUMING: LOAD each image.
    await h.advance(0.1)
    await h.suspend_fully(dst)
    for i, img in enumerate(images):
        res = await h.load(dst, img)
        assert res.ok, (i, res)
    assert await h.digest(dst) == source_digest
    assert await h.digest(src) == source_digest  # suspended: frozen
    # RESUMING -> STOP -> RUNNING: the target runs the migrated state.
    await h.resume_fully(dst)
    info = await h.info(dst)
    assert (info.initiator_suspended, info.responder_suspended) == (False, False)
    assert info.num_objects == (await h.info(src)).num_objects


@pytest.mark.parametrize("size", [1 * KiB, 64 * KiB + 123, 256 * KiB])
async def test_stop_copy_without_precopy_migrates_with_one_full_image(h, size):
    """STOP -> STOP_COPY: QUERY, SAVE(incremental=0, set_track=0) on the fully
    suspended source; one LOAD on the target (of another size: a full image
    replaces the target's state).  The smallest VF (1 KiB) and arenas ending
    inside a page too."""
    src = await h.vf(size=size, dirty_bytes_per_s=64 * KiB)
    dst = await h.vf(size=128 * KiB)
    await h.advance(1.0)
    await h.suspend_fully(src)
    img = await h.save_ok(src, (await h.query(src)).required_umem_size)
    await h.suspend_fully(dst)
    assert (await h.load(dst, img)).ok
    assert await h.digest(dst) == await h.digest(src)


@pytest.mark.parametrize("size", [1 * KiB, 64 * KiB + 123])
async def test_precopy_migration_of_odd_sized_vfs(h, size):
    """Tracking and incremental images work when the arena ends inside a page."""
    src = await h.vf(size=size, dirty_bytes_per_s=64 * KiB, reconfig_bytes=5000)
    dst = await h.vf(size=64 * KiB)
    images = [await h.save_ok(src, (await h.query(src)).required_umem_size, set_track=True)]
    await h.advance(0.3)
    await h.link.reconfigure(src)
    q = await h.query(src, incremental=True)
    assert q.migration_state == INIT
    images.append(await h.save_ok(src, q.required_umem_size, incremental=True, set_track=True))
    await h.advance(0.3)
    await stop_copy_and_load(h, src, h, dst, images)


async def test_full_final_save_after_tracking_was_lost_migrates_too(h):
    """After a tracking loss mlx5vf asks for a full image at STOP_COPY
    (PRE_COPY_ERROR forces incremental off)."""
    src = await h.vf(size=128 * KiB, dirty_bytes_per_s=64 * KiB)
    dst = await h.vf(size=128 * KiB)
    await h.save_ok(src, (await h.query(src)).required_umem_size, set_track=True)
    await h.link.inject_fault(src, Fault(FaultKind.TRACKING_LOST))
    await h.advance(0.2)
    q = await h.query(src, incremental=True)
    c, _ = await h.save_done(src, q.required_umem_size, incremental=True, set_track=True)
    assert (c.status, c.syndrome) == (CmdStatus.BAD_RES_STATE_ERR, Syndrome.TRACKING_LOST)
    await h.suspend_fully(src)
    img = await h.save_ok(src, (await h.query(src)).required_umem_size)
    await h.suspend_fully(dst)
    assert (await h.load(dst, img)).ok
    assert await h.digest(dst) == await h.digest(src)


async def precopy_images(h, vhca: int, *, warmup: float) -> list[bytes]:
    """A full tracked image after `warmup` seconds, and one incremental image."""
    await h.advance(warmup)
    images = [await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)]
    await h.advance(0.3)
    q = await h.query(vhca, incremental=True)
    assert q.required_umem_size > 0  # the workload ran for 0.3 s
    images.append(await h.save_ok(vhca, q.required_umem_size, incremental=True, set_track=True))
    return images


async def test_migration_between_two_firmwares(make_harness):
    """Across hosts: images of one firmware's VF load into another firmware's."""
    a, b = await make_harness(seed=1), await make_harness(seed=2)
    src = await a.vf(size=128 * KiB, dirty_bytes_per_s=64 * KiB)
    dst = await b.vf(size=64 * KiB)
    await stop_copy_and_load(a, src, b, dst, await precopy_images(a, src, warmup=0.2))


async def test_chain_of_another_firmware_with_the_same_seed_is_foreign(make_harness):
    """An incremental image of another host's VF is another chain (IMAGE_FOREIGN),
    even when both firmwares were started with the same seed."""
    a, b = await make_harness(seed=0), await make_harness(seed=0)
    src_a = await a.vf(size=64 * KiB, dirty_bytes_per_s=64 * KiB)
    src_b = await b.vf(size=64 * KiB, dirty_bytes_per_s=64 * KiB)
    images_a = await precopy_images(a, src_a, warmup=0.3)
    images_b = await precopy_images(b, src_b, warmup=0.7)
    dst = await a.vf(size=64 * KiB)
    await a.suspend_fully(dst)
    assert (await a.load(dst, images_a[0])).ok
    before = await a.digest(dst)
    res = await a.load(dst, images_b[1])
    assert (res.status, res.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.IMAGE_FOREIGN)
    assert await a.digest(dst) == before
