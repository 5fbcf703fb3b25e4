"""Layout of the saving stream (reference §5.3, §5.5, §5.6): the 24-byte
STOP_COPY_SIZE record first, then FW_DATA records {record_size, 0, 0} + image;
chunk mode splits the stop-copy image over several records."""

from __future__ import annotations

import asyncio

import pytest

from driver.vfio.uapi import MigState
from fwemu.link.ifc import KiB
from tests.support import mlx5 as h

S = MigState

pytestmark = pytest.mark.timeout(60)


def stop_copy_size(rec_bytes: bytes) -> int:
    return int.from_bytes(rec_bytes, "little")


async def test_stop_copy_stream_is_size_record_then_one_fw_data_image(mlx5_wide: h.Factory) -> None:
    """§5.6: the stream starts with the STOP_COPY_SIZE record, header {8,
    OPTIONAL, tag 1} + le64 buf[0] size rounded to pages (24 bytes); §5.5: then a
    16-byte FW_DATA header {actual_image_size, 0, 0} and the image.  Outside
    chunk mode STOP->STOP_COPY saves it in one image sized by the query."""
    env = await mlx5_wide()
    dev = await env.device(h.vf_config(200 * KiB))
    await dev.set_state(S.STOP)
    mark = dev.mark()
    f = await dev.set_state(S.STOP_COPY)
    stream = await h.read_to_eof(env, f)
    required = dev.cmds(mark)[0].result.required_umem_size

    assert stream[:16] == h.REC_HEADER.pack(8, h.FLAG_OPTIONAL, h.TAG_STOP_COPY_SIZE)
    recs = h.parse_stream(stream)
    assert [(r.size, r.flags, r.tag) for r in recs] == [
        (8, h.FLAG_OPTIONAL, h.TAG_STOP_COPY_SIZE),
        (required, 0, h.TAG_FW_DATA),
    ]
    assert recs[0].offset == 0 and recs[1].offset == h.STOP_COPY_SIZE_RECORD
    assert stop_copy_size(recs[0].payload) == h.pages(required)
    assert recs[1].payload[:4] == b"VHCA"  # the firmware's image, verbatim
    assert len(stream) == h.STOP_COPY_SIZE_RECORD + 16 + required
    # The image is what the firmware wrote: the digest of a target loading it
    # equals the source's.
    src_digest = await dev.digest()
    dst = await env.device(h.vf_config(200 * KiB))
    await h.load_stream(dst, stream)
    assert await dst.digest() == src_digest


async def test_pre_copy_stream_starts_with_size_record_then_the_full_tracked_image(
    mlx5: h.Factory,
) -> None:
    """§5.6: a PRE_COPY saving file starts with the same 24-byte record; its
    le64 is buf[0]'s size, which for tracking has 10% headroom (non-chunk);
    then the first tracked SAVE's FW_DATA record holds the full image."""
    env = await mlx5()
    dev = await env.device(h.vf_config(160 * KiB))
    mark = dev.mark()
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    required = dev.cmds(mark)[0].result.required_umem_size
    stream = await h.read_available(f)
    recs = h.parse_stream(stream)
    assert [(r.size, r.flags, r.tag) for r in recs] == [
        (8, h.FLAG_OPTIONAL, h.TAG_STOP_COPY_SIZE),
        (required, 0, h.TAG_FW_DATA),
    ]
    assert stop_copy_size(recs[0].payload) == h.pages(required + required // 10)


async def test_chunk_mode_stop_copy_is_several_records_and_ends_with_eof(
    mlx5_wide: h.Factory,
) -> None:
    """§5.6: in chunk mode (cap_2.migration_in_chunks) buf[0] is min(max chunk,
    full size) and the stop-copy image comes in pieces: the first SAVE(inc 0,
    track 0), then continuation SAVE(inc 1, track 0)s until
    next_required_umem_size is 0.  Each piece is one FW_DATA record no larger
    than the chunk; together they are the query's remaining_total_size; the
    stream ends with read() == b"" and loads to an equal digest."""
    chunk = 16 * KiB
    env = await mlx5_wide(max_chunk_size=chunk)
    cfg = h.vf_config(256 * KiB, chunks=True, chunk_size=chunk)
    dev = await env.device(cfg)
    await dev.set_state(S.STOP)
    mark = dev.mark()
    f = await dev.set_state(S.STOP_COPY)
    stream = await h.read_to_eof(env, f)
    assert await f.read(100) == b""
    sent = dev.cmds(mark)
    query = sent[0].result
    assert sent[0].brief == ("QUERY", 0) and sent[0].args["chunk"] is True
    total = query.remaining_total_size
    assert query.required_umem_size <= chunk < total

    recs = h.parse_stream(stream)
    assert (recs[0].size, recs[0].flags, recs[0].tag) == (8, h.FLAG_OPTIONAL, h.TAG_STOP_COPY_SIZE)
    assert stop_copy_size(recs[0].payload) == h.pages(max(query.required_umem_size, chunk))
    data = recs[1:]
    assert len(data) >= (256 * KiB) // chunk
    assert all(r.tag == h.TAG_FW_DATA and r.flags == 0 and 0 < r.size <= chunk for r in data)
    assert sum(r.size for r in data) == total
    saves = [c for c in sent if c.name == "SAVE"]
    assert [c.brief for c in saves] == [("SAVE", 0, 0)] + [("SAVE", 1, 0)] * (len(data) - 1)
    assert [c.completion.actual_image_size for c in saves if c.completion] == [r.size for r in data]
    assert saves[-1].completion is not None
    assert saves[-1].completion.next_required_umem_size == 0

    src_digest = await dev.digest()
    dst = await env.device(cfg)
    await h.load_stream(dst, stream)
    assert await dst.digest() == src_digest


async def test_chunk_mode_holds_at_most_two_unread_chunks(mlx5: h.Factory) -> None:
    """§5.6: with 2 chunks waiting to be read the next chunk's SAVE is parked
    and issued only when a chunk buffer was fully read."""
    chunk = 16 * KiB
    env = await mlx5("virtual", max_chunk_size=chunk)
    dev = await env.device(h.vf_config(128 * KiB, chunks=True, chunk_size=chunk))
    await dev.set_state(S.STOP)
    mark = dev.mark()
    f = await dev.set_state(S.STOP_COPY)

    def saves() -> int:
        return len([c for c in dev.cmds(mark) if c.name == "SAVE"])

    for _ in range(10):  # let whatever can happen, happen
        await env.advance(0)
        await asyncio.sleep(0.01)
    assert saves() == 2
    assert dev.saving_migf.num_ready_chunks == 2
    # Read the size record and the first chunk's header and image.
    head = await f.read(h.STOP_COPY_SIZE_RECORD + 16, nonblock=True)
    size = h.REC_HEADER.unpack_from(head, h.STOP_COPY_SIZE_RECORD)[0]
    await f.read(size - 1, nonblock=True)
    await asyncio.sleep(0.02)
    assert saves() == 2  # the chunk buffer is not fully read yet
    await f.read(1, nonblock=True)
    await env.wait_until(lambda: saves() == 3, "the parked chunk SAVE")


async def test_precopy_records_follow_the_initial_image(mlx5_wide: h.Factory) -> None:
    """§5.5: each incremental SAVE issued by GET_PRECOPY_INFO appends one
    FW_DATA record {actual_image_size, 0, 0} + image to the same stream."""
    env = await mlx5_wide("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    stream = await h.read_available(f)
    for _ in range(3):
        await env.advance(0.02)  # the workload dirties pages
        mark = dev.mark()
        await h.precopy_info(f)
        await env.settle(dev)
        [save] = [c for c in dev.cmds(mark) if c.name == "SAVE"]
        assert save.brief == ("SAVE", 1, 1)
        got = await h.read_available(f)
        assert save.completion is not None
        assert len(got) == 16 + save.completion.actual_image_size
        stream += got
    recs = h.parse_stream(stream)
    assert [r.tag for r in recs] == [h.TAG_STOP_COPY_SIZE] + [h.TAG_FW_DATA] * 4
    assert all(r.payload[:4] == b"VHCA" and r.size > h.IMAGE_HEADER for r in recs[1:])
