"""The driver's resident memory of its data buffers: a buffer that waits on
the free list for the rest of a saving file leaves the driver's RSS (its
pages are released, the buffer stays, as mlx5vf keeps it until the file
ends), and a released buffer's bytes are still there when it is read again."""

from __future__ import annotations

import ctypes
from collections.abc import AsyncIterator

import pytest

from driver.mlx5.save import SaveFile
from driver.vfio.uapi import MigState
from fwemu.hostmem import create_segment, release_pages, unlink_segment
from fwemu.link.ifc import KiB
from tests.support import mlx5 as h
from tests.support.mlx5.devices import environments

S = MigState

pytestmark = pytest.mark.timeout(60)


def resident(view: memoryview) -> int:
    """Bytes of the mapping under `view` resident in this process (the Rss of
    its VMA in /proc/self/smaps)."""
    holder = (ctypes.c_char * 1).from_buffer(view)
    addr = ctypes.addressof(holder)
    del holder
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping under the view")


def test_released_pages_leave_the_rss_and_keep_their_bytes() -> None:
    seg = create_segment(1 << 20)
    try:
        seg.view[:] = bytes(range(256)) * 4096
        assert resident(seg.view) == 1 << 20
        assert release_pages(seg.view)
        assert resident(seg.view) == 0
        assert bytes(seg.view[:512]) == bytes(range(256)) * 2  # mapped again, same bytes
    finally:
        seg.close()
        unlink_segment(seg.name)  # else every run of the suite leaves 1 MiB in /dev/shm


def test_release_pages_leaves_memory_that_is_no_mapping_alone() -> None:
    data = bytearray(b"x" * 8192)
    assert not release_pages(memoryview(data))
    assert data == b"x" * 8192


@pytest.fixture
async def shm_env() -> AsyncIterator[h.Factory]:
    """Environments over the gRPC adapter: buffers in shared memory segments."""
    async for make in environments("grpc"):
        yield make


async def test_buffers_read_to_their_end_leave_the_rss_and_stay(shm_env: h.Factory) -> None:
    """A saving buffer read to its end holds no page of the driver's: the
    precopy buffer on the free list, and in chunk mode each stop-copy chunk
    buffer back in its slot before the next chunk's SAVE.  The buffers stay
    (as mlx5vf's) and the stream they carry loads to the source's digest."""
    chunk = 64 * KiB
    env = await shm_env(max_chunk_size=chunk)
    dev = await env.device(h.vf_config(512 * KiB, chunks=True, chunk_size=chunk))
    f = await dev.set_state(S.PRE_COPY)
    assert isinstance(f, SaveFile)
    await env.settle(dev)
    precopy = await h.read_available(f)
    idle = [b for b in f.avail_list if b.host is not None]
    assert idle and all(resident(b.host.view) == 0 for b in idle)  # type: ignore[union-attr]
    await dev.set_state(S.PRE_COPY_P2P)
    await dev.set_state(S.STOP_COPY)
    stream = bytearray(precopy)
    chunks_seen = set()
    while chunk_data := await f.read(chunk // 4):
        stream += chunk_data
        for b in f.buf:
            if b is not None:  # back in its slot: read to its end
                chunks_seen.add(id(b))
                assert resident(b.view) == 0
    assert len(chunks_seen) == 2
    assert all(b in f.avail_list for b in idle)  # still allocated
    assert all(resident(b.host.view) == 0 for b in idle)  # type: ignore[union-attr]
    src_digest = await dev.digest()
    await dev.set_state(S.STOP)
    dst = await env.device(h.vf_config(512 * KiB, chunks=True, chunk_size=chunk))
    await h.load_stream(dst, bytes(stream))
    assert await dst.digest() == src_digest


async def test_a_precopy_buffer_read_during_stop_copy_leaves_the_rss(
    shm_env: h.Factory,
) -> None:
    """The precopy SAVE the last GET_PRECOPY_INFO issued (all read, the
    firmware has more) is read in stop-copy; its buffer then goes to the free
    list for the rest of the file and holds no page of the driver's."""
    chunk = 64 * KiB
    env = await shm_env(max_chunk_size=chunk)
    dev = await env.device(h.vf_config(512 * KiB, chunks=True, chunk_size=chunk))
    f = await dev.set_state(S.PRE_COPY)
    assert isinstance(f, SaveFile)
    await env.settle(dev)
    await h.read_available(f)
    info = await h.precopy_info(f)
    assert info.dirty_bytes or info.initial_bytes  # a SAVE of the next piece
    await env.settle(dev)
    queued = [b for b in f.buf_list if b.host is not None and not b.stop_copy_chunk_num]
    assert queued
    await dev.set_state(S.PRE_COPY_P2P)
    await dev.set_state(S.STOP_COPY)
    await h.read_to_eof(env, f)
    assert all(b in f.avail_list for b in queued)
    assert all(resident(b.host.view) == 0 for b in queued)  # type: ignore[union-attr]
