"""Chunk mode (cap_2.migration_in_chunks): final images split over several SAVEs."""

from __future__ import annotations

import pytest

from fwemu.link.ifc import CmdStatus, KiB, MiB, Syndrome
from fwemu.model.image import IMAGE_HEADER_SIZE

# These tests move image bytes: run them with firmware-held memory too.
pytestmark = pytest.mark.remote_memory

CHUNK = 64 * KiB


async def save_in_pieces(h, vhca: int, *, incremental: bool) -> list[tuple[int, bytes]]:
    """The mlx5vf stop-copy chunk loop: the first SAVE into a buffer of the
    QUERY(chunk=1) size, then `incremental=1, set_track=0` continuation SAVEs into
    buffers of each completion's next_required_umem_size, until it is 0.
    Returns (next_required_umem_size, image) per piece."""
    q = await h.query(vhca, incremental=incremental, chunk=True)
    assert q.ok, q
    size, inc = q.required_umem_size, incremental
    pieces: list[tuple[int, bytes]] = []
    while True:
        c, img = await h.save_done(vhca, size, incremental=inc)
        assert c.status == 0, c
        assert 0 < c.actual_image_size <= size
        pieces.append((c.next_required_umem_size, img))
        if c.next_required_umem_size == 0:
            return pieces
        assert len(pieces) < 1000
        size, inc = c.next_required_umem_size, True


async def test_final_full_image_in_chunks_reproduces_the_state(h):
    """After QUERY(chunk=1) a final SAVE into a chunk-sized buffer says the size
    of the next piece in next_required_umem_size (> 0, at most chunk_size) until
    the last piece (0); loading every piece in order reproduces the state."""
    src = await h.vf(size=512 * KiB, chunk_size=CHUNK)
    dst = await h.vf(size=64 * KiB)
    await h.suspend_fully(src)
    pieces = await save_in_pieces(h, src, incremental=False)
    assert len(pieces) >= 512 * KiB // CHUNK
    assert all(0 < n <= CHUNK for n, _ in pieces[:-1])
    assert pieces[-1][0] == 0
    await h.suspend_fully(dst)
    for _, img in pieces:
        res = await h.load(dst, img)
        assert res.ok, res
    assert await h.digest(dst) == await h.digest(src)


async def test_remaining_total_size_falls_as_pieces_are_saved(h):
    """QUERY(incremental=1, chunk=1) during a chunked save reports what is left
    of it (the continuation pieces are incremental SAVEs)."""
    vhca = await h.vf(size=512 * KiB, chunk_size=CHUNK)
    await h.suspend_fully(vhca)
    q = await h.query(vhca, chunk=True)
    total = q.remaining_total_size
    _, img = await h.save_done(vhca, q.required_umem_size)
    q2 = await h.query(vhca, chunk=True, incremental=True)
    assert q2.ok, q2
    assert q2.required_umem_size == min(CHUNK, q2.remaining_total_size)
    assert total - len(img) - IMAGE_HEADER_SIZE * 2 <= q2.remaining_total_size < total


@pytest.mark.parametrize(("size", "chunk"), [(512 * KiB, CHUNK), (64 * KiB, 1 * MiB)])
async def test_remaining_total_size_is_the_sum_of_the_pieces(h, size, chunk):
    """README: in chunk mode remaining_total_size is the whole image."""
    vhca = await h.vf(size=size, chunk_size=chunk)
    await h.suspend_fully(vhca)
    total = (await h.query(vhca, chunk=True)).remaining_total_size
    pieces = await save_in_pieces(h, vhca, incremental=False)
    assert sum(len(img) for _, img in pieces) == total


async def test_final_save_into_a_chunk_buffer_without_chunk_query_is_too_small(h):
    """Chunk mode is armed by QUERY(chunk=1); without it a final image must fit
    whole (BAD_PARAM / BUFFER_TOO_SMALL)."""
    vhca = await h.vf(size=256 * KiB, chunk_size=CHUNK)
    await h.suspend_fully(vhca)
    pending = await h.save(vhca, CHUNK)
    assert (pending.accepted.status, pending.accepted.syndrome) == (
        CmdStatus.BAD_PARAM_ERR,
        Syndrome.BUFFER_TOO_SMALL,
    )


async def test_precopy_saves_are_not_chunked(h):
    """Tracked SAVEs in chunk mode take what fits in one complete image: no
    next piece is announced."""
    vhca = await h.vf(size=256 * KiB, chunk_size=CHUNK, dirty_bytes_per_s=0)
    q = await h.query(vhca, chunk=True)
    assert q.required_umem_size == CHUNK
    c, _ = await h.save_done(vhca, q.required_umem_size, set_track=True)
    assert c.status == 0, c
    assert c.next_required_umem_size == 0
    assert c.actual_image_size <= CHUNK
    # What did not fit is pending for the next incremental SAVE.
    q = await h.query(vhca, incremental=True, chunk=True)
    assert q.remaining_total_size > 256 * KiB - CHUNK


async def test_final_incremental_image_in_chunks(h):
    """PRE_COPY_P2P -> STOP_COPY in chunk mode: the final incremental image in
    pieces, every continuation `incremental=1, set_track=0`."""
    src = await h.vf(size=256 * KiB, chunk_size=CHUNK, dirty_bytes_per_s=0)
    dst = await h.vf(size=64 * KiB)
    await h.query(src, chunk=True)
    full = (await h.query(src)).required_umem_size
    img0 = await h.save_ok(src, full, set_track=True)
    await h.link.reconfigure(src, [("QP", 200 * KiB)])
    await h.suspend_fully(src)
    pieces = await save_in_pieces(h, src, incremental=True)
    assert len(pieces) >= 3
    await h.suspend_fully(dst)
    assert (await h.load(dst, img0)).ok
    for _, img in pieces:
        res = await h.load(dst, img)
        assert res.ok, res
    assert await h.digest(dst) == await h.digest(src)


async def test_pieces_must_be_loaded_in_order(h):
    """Pieces of one image follow each other: a skipped or repeated piece is
    IMAGE_OUT_OF_ORDER, and the refusal leaves the target as it was."""
    src = await h.vf(size=256 * KiB, chunk_size=CHUNK)
    dst = await h.vf(size=64 * KiB)
    await h.suspend_fully(src)
    pieces = [img for _, img in await save_in_pieces(h, src, incremental=False)]
    assert len(pieces) >= 3
    await h.suspend_fully(dst)
    before = await h.digest(dst)
    res = await h.load(dst, pieces[1])  # a continuation first
    assert (res.status, res.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.IMAGE_OUT_OF_ORDER)
    assert await h.digest(dst) == before
    assert (await h.load(dst, pieces[0])).ok
    after_first = await h.digest(dst)
    res = await h.load(dst, pieces[2])  # skips piece 1
    assert (res.status, res.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.IMAGE_OUT_OF_ORDER)
    assert await h.digest(dst) == after_first
    assert (await h.load(dst, pieces[1])).ok
    res = await h.load(dst, pieces[1])  # a repeat
    assert (res.status, res.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.IMAGE_OUT_OF_ORDER)
    for img in pieces[2:]:
        assert (await h.load(dst, img)).ok
    assert await h.digest(dst) == await h.digest(src)


async def test_smallest_accepted_chunk_size_still_saves_in_pieces(h):
    """Any chunk_size VfConfig accepts must give a chunked save that completes."""
    src = await h.vf(size=64 * KiB, chunk_size=4 * KiB)
    dst = await h.vf(size=64 * KiB)
    await h.suspend_fully(src)
    pieces = await save_in_pieces(h, src, incremental=False)
    await h.suspend_fully(dst)
    for _, img in pieces:
        assert (await h.load(dst, img)).ok
    assert await h.digest(dst) == await h.digest(src)


async def test_a_new_session_drops_a_final_save_left_in_pieces(h):
    """A migration abandoned in STOP_COPY leaves a chunked final save half
    done; the function runs again and a new migration starts with a tracked
    full SAVE (a new chain).  Its final SAVE must be a fresh image of the new
    chain, not the rest of the old one: the destination loads the new
    migration's images, in order, and ends with the source's state."""
    src = await h.vf(size=512 * KiB, chunk_size=CHUNK, dirty_bytes_per_s=0)
    dst = await h.vf(size=64 * KiB)
    await h.suspend_fully(src)
    q = await h.query(src, chunk=True)
    c, _ = await h.save_done(src, q.required_umem_size)
    assert c.status == 0 and c.next_required_umem_size > 0  # pieces are left
    await h.resume_fully(src)  # the migration was abandoned
    # The next migration: a tracked full image (precopy), then the final one.
    q = await h.query(src, chunk=True)
    img0 = await h.save_ok(src, q.required_umem_size, set_track=True)
    await h.link.reconfigure(src, [("QP", 100 * KiB)])
    await h.suspend_fully(src)
    pieces = await save_in_pieces(h, src, incremental=True)
    await h.suspend_fully(dst)
    for img in [img0, *(img for _, img in pieces)]:
        res = await h.load(dst, img)
        assert res.ok, res
    assert await h.digest(dst) == await h.digest(src)
