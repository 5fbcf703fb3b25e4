"""driver.service.usermap, the table behind MapUserMemory, without gRPC."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import threading
from collections.abc import Iterator

import pytest

from driver.service.usermap import MAX_MAPPINGS, UserMappings
from driver.vfio.errors import VfioError
from fwemu.hostmem import Segment, default_shm_dir
from tests.support.driver_service import shm_segment

SIZE = 64 << 10


@pytest.fixture(name="seg")
def seg_fixture() -> Iterator[Segment]:
    with shm_segment(SIZE, "test-usermap") as seg:
        yield seg


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_an_unmap_during_a_copy_waits_for_it(seg: Segment) -> None:
    """A range in use keeps its mapping after UnmapUserMemory until the copy
    is done; then the file is closed; the address is EFAULT at once."""
    table = UserMappings()
    fds = open_fds()
    addr = await table.map(seg.name, SIZE)
    mapped = open_fds()
    assert mapped > fds
    with table.range(addr + 10, 4) as dest:
        table.unmap(addr)
        with pytest.raises(VfioError) as e:
            table.range(addr, 1)
        assert e.value.errno == errno.EFAULT
        dest[0:4] = memoryview(b"abcd")  # still mapped for the copy in flight
        assert open_fds() == mapped
    assert bytes(seg.view[10:14]) == b"abcd"
    assert open_fds() == fds


async def test_close_unmaps_everything_and_addresses_are_not_reused(seg: Segment) -> None:
    table = UserMappings()
    fds = open_fds()
    a = await table.map(seg.name, SIZE)
    b = await table.map(seg.name, 4096)
    assert b > a + SIZE  # a guard page between mappings
    table.close()
    assert len(table) == 0 and open_fds() == fds
    assert await table.map(seg.name, 4096) > b
    table.close()


async def test_a_range_must_lie_inside_one_mapping(seg: Segment) -> None:
    table = UserMappings()
    a = await table.map(seg.name, SIZE)
    b = await table.map(seg.name, SIZE)
    for addr, n in ((a + SIZE - 1, 2), (a - 1, 1), (b + SIZE, 1), (a + SIZE, 1)):
        with pytest.raises(VfioError) as e:
            table.range(addr, n)
        assert e.value.errno == errno.EFAULT
    with table.range(b + SIZE - 1, 1) as r:
        assert len(r) == 1
    table.close()


async def test_a_segment_with_pages_past_its_end_and_a_hole_inside_is_given_its_pages() -> None:
    """st_blocks cannot tell a fully backed segment from one with pages
    reserved past its end (fallocate KEEP_SIZE) and a hole inside: the map
    walks every page anyway, so a copy into that hole never needs a page a
    full tmpfs cannot give (SIGBUS, every client's driver gone)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with shm_segment(SIZE, "test-usermap-keep-size") as seg:
        path = os.path.join(default_shm_dir(), seg.name)
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, SIZE)
            keep_size = 1  # FALLOC_FL_KEEP_SIZE
            if libc.fallocate(fd, keep_size, ctypes.c_long(SIZE // 2), ctypes.c_long(SIZE)):
                pytest.skip(f"fallocate: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)
        st = os.stat(path)
        assert st.st_blocks * 512 >= st.st_size  # looks fully backed
        table = UserMappings()
        try:
            before = os.stat(path).st_blocks
            await table.map(seg.name, SIZE)
            assert os.stat(path).st_blocks > before  # the hole got its pages
        finally:
            table.close()


BIG = 64 << 20  # a sparse segment whose pages the map must back (and zero)


async def test_the_pages_are_backed_off_the_loop() -> None:
    """A client's sparse segment (up to 4 GiB) is zeroed page by page when
    the map backs it: on a worker thread, so the driver's one loop serves the
    other clients meanwhile instead of stalling for as long as that takes."""
    with shm_segment(BIG, "test-usermap-big") as seg:
        table = UserMappings()
        try:
            mapping = asyncio.create_task(table.map(seg.name, BIG))
            await asyncio.sleep(0)  # the map starts and hands its pages to a thread
            assert not mapping.done()  # this loop runs meanwhile
            addr = await mapping
            path = os.path.join(default_shm_dir(), seg.name)
            assert os.stat(path).st_blocks * 512 >= BIG
            with table.range(addr + BIG - 4, 4) as dest:
                dest[0:4] = memoryview(b"last")
            assert bytes(seg.view[BIG - 4 :]) == b"last"
        finally:
            table.close()


async def test_a_client_gone_during_its_map_gets_ebadf_and_leaves_nothing(seg: Segment) -> None:
    table, other = UserMappings(principal="a"), UserMappings(principal="b")
    fds = open_fds()
    mapping = asyncio.create_task(table.map(seg.name, SIZE))
    await asyncio.sleep(0)
    table.close()  # the client's exit, while its pages are being backed
    with pytest.raises(VfioError) as e:
        await mapping
    assert e.value.errno == errno.EBADF
    assert len(table) == 0 and open_fds() == fds
    await other.map(seg.name, SIZE)  # the file was given back
    other.close()


async def test_a_map_cancelled_while_its_pages_are_backed_gives_all_back(seg: Segment) -> None:
    """The thread still has the file open when the call is cancelled (the
    client's RPC gone): the fd and the file go back once it is done."""
    table, other = UserMappings(principal="a"), UserMappings(principal="b")
    fds = open_fds()
    mapping = asyncio.create_task(table.map(seg.name, SIZE))
    await asyncio.sleep(0)
    mapping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await mapping
    for _ in range(200):
        if open_fds() == fds:
            break
        await asyncio.sleep(0.01)
    assert len(table) == 0 and open_fds() == fds
    await other.map(seg.name, SIZE)
    other.close()


async def test_maps_in_flight_count_against_the_per_client_limit(seg: Segment) -> None:
    table = UserMappings()
    results = await asyncio.gather(
        *(table.map(seg.name, 4096) for _ in range(MAX_MAPPINGS + 1)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, VfioError)]
    assert len(refused) == 1 and refused[0].errno == errno.ENOMEM
    assert len(table) == MAX_MAPPINGS
    table.close()


async def test_one_client_backs_one_mapping_at_a_time_and_others_are_not_held_up(
    seg: Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker threads are the driver's, not one client's: a client's
    maps take a thread one after another, while another client's map gets
    its own thread at once."""
    running: list[int] = []
    most = 0
    gate = threading.Event()
    lock = threading.Lock()

    def fallocate(fd: int, offset: int, length: int) -> None:
        nonlocal most
        with lock:
            running.append(fd)
            most = max(most, len(running))
        gate.wait(10)
        with lock:
            running.remove(fd)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    a, b = UserMappings(principal="a"), UserMappings(principal="a")
    maps_a = [asyncio.create_task(a.map(seg.name, 4096)) for _ in range(3)]
    map_b = asyncio.create_task(b.map(seg.name, 4096))
    for _ in range(200):  # until both clients have a thread in fallocate
        if len(running) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(running) == 2  # a's first and b's, not a's three
    gate.set()
    await asyncio.gather(*maps_a, map_b)
    assert most == 2 and len(a) == 3 and len(b) == 1
    a.close()
    b.close()
