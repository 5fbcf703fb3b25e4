"""fwemu.hostmem.create_segment(reserve=True), as a client's segment is made:
its pages allocated and zeroed in the process that made it.  tmpfs leaves a
fallocated page to be zeroed at its first use; for a client's segment that
was the driver's fallocate at MapUserMemory, on the driver's one loop (up to
85 ms per 16 MiB segment at 64 migrations at once, on a machine whose host
backs its memory on first touch)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fwemu import hostmem
from fwemu.hostmem import Segment, create_segment, default_shm_dir, unlink_segment

LENGTH = 4 << 20


def resident(seg: Segment) -> int:
    """Bytes of this process's mapping of `seg` in its page tables (smaps Rss)."""
    path = os.path.join(default_shm_dir(), seg.name)
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            if "-" in line.split(" ", 1)[0]:  # a mapping's first line
                inside = line.rstrip().endswith(path) or line.rstrip().endswith(f"{path} (deleted)")
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{path} is not mapped")


def made(**kwargs: bool) -> Iterator[Segment]:
    seg = create_segment(LENGTH, prefix="test-reserve", **kwargs)
    try:
        yield seg
    finally:
        unlink_segment(seg.name)
        seg.close()


@pytest.mark.parametrize("madvise", [True, False], ids=["populate-write", "a-byte-per-page"])
def test_a_reserved_segment_has_every_page_zeroed_here(
    madvise: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not madvise:  # a kernel without MADV_POPULATE_WRITE (before 5.14): EINVAL
        monkeypatch.setattr(hostmem, "MADV_POPULATE_WRITE", 0x7FFF)
    for seg in made(reserve=True):
        assert resident(seg) == LENGTH
        assert bytes(seg.view[:: hostmem.PAGE]) == bytes(LENGTH // hostmem.PAGE)


def test_an_unreserved_segment_is_left_to_its_first_touch() -> None:
    for seg in made():
        assert resident(seg) == 0
