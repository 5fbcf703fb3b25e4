"""driver.service.usermap, the table behind MapUserMemory, without gRPC."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from driver.service.usermap import UserMappings
from driver.vfio.errors import VfioError
from fwemu.hostmem import Segment, create_segment, default_shm_dir, unlink_segment
from tests.support.driver_service import shm_segment

SIZE = 64 << 10


@pytest.fixture(name="seg")
def seg_fixture() -> Iterator[Segment]:
    with shm_segment(SIZE, "test-usermap") as seg:
        yield seg


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_unmap_during_a_copy_waits_for_it(seg: Segment) -> None:
    """A range in use keeps its mapping after UnmapUserMemory until the copy
    is done; then the file is closed; the address is EFAULT at once."""
    table = UserMappings()
    fds = open_fds()
    addr = table.map(seg.name, SIZE)
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


def test_close_unmaps_everything_and_addresses_are_not_reused(seg: Segment) -> None:
    table = UserMappings()
    fds = open_fds()
    a = table.map(seg.name, SIZE)
    b = table.map(seg.name, 4096)
    assert b > a + SIZE  # a guard page between mappings
    table.close()
    assert len(table) == 0 and open_fds() == fds
    assert table.map(seg.name, 4096) > b
    table.close()


def test_a_range_must_lie_inside_one_mapping(seg: Segment) -> None:
    table = UserMappings()
    a = table.map(seg.name, SIZE)
    b = table.map(seg.name, SIZE)
    for addr, n in ((a + SIZE - 1, 2), (a - 1, 1), (b + SIZE, 1), (a + SIZE, 1)):
        with pytest.raises(VfioError) as e:
            table.range(addr, n)
        assert e.value.errno == errno.EFAULT
    with table.range(b + SIZE - 1, 1) as r:
        assert len(r) == 1
    table.close()


@pytest.mark.parametrize("reserved", [False, True])
def test_map_backs_the_pages_only_of_a_segment_with_holes(
    reserved: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sparse segment is given its pages (posix_fallocate); one whose every
    page its owner already reserved is not walked again."""
    seg = create_segment(SIZE, prefix="test-usermap-backed", reserve=reserved)
    calls: list[int] = []
    fallocate = os.posix_fallocate

    def spy(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        fallocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", spy)
    table = UserMappings()
    try:
        path = os.path.join(default_shm_dir(), seg.name)
        table.map(seg.name, SIZE)
        assert calls == ([] if reserved else [SIZE])
        assert os.stat(path).st_blocks * 512 >= SIZE
    finally:
        table.close()
        unlink_segment(seg.name)
        seg.close()
